"""Serving a forecaster: the last days of one ticker (Date and OHLCV rows, as JSON or a CSV file) in; the
next close out, with the persistence forecast (tomorrow = today) beside it. The window is built by
`dlpipe.data.stocks.forecast_input`, from the same features as every training and test window."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from dlpipe.data.stocks import PRICE_COLUMNS, forecast_input
from dlpipe.errors import DlpipeError
from dlpipe.serving.tasks import Adapter, BadRequest, Batch, Limits, instances, register_adapter


@register_adapter
class ForecasterAdapter(Adapter):
    task = "forecaster"
    upload_types = {"text/csv": (".csv",)}

    def __init__(self, contract) -> None:
        super().__init__(contract)
        self.tickers = [str(t) for t in self.metadata_json("tickers")]
        self.window = int(self.metadata_json("window"))
        self.features = [feature["name"] for feature in self.metadata_json("features")]

    def describe(self) -> dict[str, Any]:
        return {
            "tickers": self.tickers,
            "window": self.window,
            "rows_needed": self.window + 1,
            "row_columns": ["Date", *PRICE_COLUMNS],
            "features": self.features,
            "accepts": ["application/json", *self.upload_types],
        }

    def _instance(self, ticker: Any, prices: pd.DataFrame, where: str) -> tuple[np.ndarray, dict[str, Any]]:
        if ticker not in self.tickers:
            raise BadRequest(
                f"{where}: ticker {ticker!r} is not one this model was trained on ({', '.join(self.tickers)})"
            )
        try:
            inputs, last_close, last_date = forecast_input(
                prices, self.window, self.tickers.index(ticker), len(self.tickers), where
            )
        except DlpipeError as exc:
            raise BadRequest(str(exc)) from None
        return inputs, {"ticker": ticker, "last_close": last_close, "last_date": str(last_date.date())}

    def parse_json(self, payload: Any, limits: Limits) -> Batch:
        batched = isinstance(payload, dict) and "instances" in payload  # else one {ticker, rows} object
        if batched and ("rows" in payload or "ticker" in payload):
            raise BadRequest("give either 'instances' (a list of {ticker, rows} objects) or 'ticker' and 'rows'")
        items = instances(payload, "instances", limits) if batched else [payload]
        rows, context = [], []
        for i, item in enumerate(items):
            where = f"instances[{i}]" if batched else "request"
            if not isinstance(item, dict) or not isinstance(item.get("rows"), list):
                raise BadRequest(f"{where}: expected an object with 'ticker' and 'rows' (a list of Date/OHLCV objects)")
            if not all(isinstance(row, dict) for row in item["rows"]):
                raise BadRequest(f"{where}: each row must be an object with Date, {', '.join(PRICE_COLUMNS)}")
            inputs, info = self._instance(item.get("ticker"), pd.DataFrame(item["rows"]), where)
            rows.append(inputs)
            context.append(info)
        return Batch(np.concatenate(rows), context)

    def parse_upload(self, data: bytes, media_type: str, query: Mapping[str, str], limits: Limits) -> Batch:
        if media_type not in self.upload_types:
            raise BadRequest(
                f"content type {media_type!r} is not one this model takes (application/json, text/csv)", status=415
            )
        if not data:
            raise BadRequest("the CSV is empty")
        try:
            prices = pd.read_csv(io.BytesIO(data))
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            raise BadRequest(f"not a readable price CSV ({' '.join(str(exc).split())[:200]})") from None
        inputs, info = self._instance(query.get("ticker"), prices, "csv")
        return Batch(inputs, [info])

    def answers(self, outputs: np.ndarray, batch: Batch) -> list[dict[str, Any]]:
        answers = []
        for log_return, info in zip(outputs[:, 0].astype(np.float64), batch.context, strict=True):
            # The output is log(close[t+1] / close[t]) (the graph's dlpipe.output metadata).
            try:
                next_close = info["last_close"] * math.exp(float(log_return))
            except OverflowError:
                next_close = math.inf
            if math.isfinite(log_return) and not math.isfinite(next_close):  # JSON has no Infinity
                raise BadRequest(
                    f"{info['ticker']}: the forecast of a {info['last_close']:.6g} close rising by a log return of"
                    f" {float(log_return):.6g} is beyond the largest number JSON can answer"
                )
            answers.append(
                {**info, "log_return": float(log_return), "next_close": next_close, "persistence": info["last_close"]}
            )
        return answers

    def smoke_input(self) -> np.ndarray:
        inputs = np.zeros((1, self.window, len(self.features) + len(self.tickers)), dtype=np.float32)
        inputs[:, :, len(self.features)] = 1.0  # the first ticker's column
        return inputs
