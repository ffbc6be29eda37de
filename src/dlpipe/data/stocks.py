"""Daily stock prices: the committed real snapshot or yfinance, validated; features and windows.

The forecasting problem (as in the course notes: predict day t+1 from the days before it) is posed on
log returns rather than price levels, so that a model trained on 2004-2010 prices is not asked to
extrapolate to price levels it never saw; predictions are turned back into prices for the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dlpipe.config import StocksParams
from dlpipe.errors import DlpipeError, first_line
from dlpipe.io import read_json, sha256_file

PRICE_COLUMNS = ("Open", "High", "Low", "Close", "Volume")
# The per-day features, in input order, with the formula `make_features` computes (day t, the day before t-1).
# Written into every exported forecaster's metadata: a caller must feed exactly these, not raw prices.
FEATURE_FORMULAS = {
    "close_logret": "log(close[t] / close[t-1])",  # today's close-to-close log return
    "log_range": "log(high[t] / low[t])",  # intraday range: a volatility proxy
    "log_body": "log(close[t] / open[t])",  # candle body: direction within the day
    "volume_logchange": "log(1 + volume[t]) - log(1 + volume[t-1])",  # volume surprise
}
FEATURES = tuple(FEATURE_FORMULAS)
MIN_ROWS = 60
# Chronological split of each ticker's days: the model never trains on days after those it is evaluated
# on, and windows never cross a boundary (see `part_bounds`).
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
SPLITS = tuple(SPLIT_FRACTIONS)
MIN_SPLIT_SAMPLES = 10  # fewer windows than this in a split cannot train, validate or test anything


def read_sample(samples_dir: Path, ticker: str) -> pd.DataFrame:
    path = samples_dir / "stocks" / f"{ticker}.csv"
    if not path.is_file():
        available = sorted(p.stem for p in (samples_dir / "stocks").glob("*.csv"))
        raise DlpipeError(
            f"data.stocks.tickers: no committed sample for {ticker!r} (available: {', '.join(available)})"
        )
    frame = _read_csv(path)
    frame = frame.rename(columns={frame.columns[0]: "Date"})
    return frame


def _iso(day) -> str | None:
    return day.isoformat() if day else None


def download_yfinance(params: StocksParams, ticker: str) -> pd.DataFrame:
    import yfinance as yf

    try:
        frame = yf.download(
            ticker,
            start=_iso(params.start),
            end=_iso(params.end),
            interval="1d",
            auto_adjust=True,
            progress=False,
            threads=False,
        )
    except Exception as exc:  # noqa: BLE001 - transport errors become one clear line
        raise DlpipeError(f"yfinance download of {ticker!r} failed: {type(exc).__name__}: {exc}") from exc
    if frame is None or frame.empty:
        raise DlpipeError(
            f"data.stocks.tickers: yfinance returned no rows for {ticker!r} ({params.start}..{params.end})"
        )
    if isinstance(frame.columns, pd.MultiIndex):  # (field, ticker) columns for one or more tickers
        frame = frame.xs(frame.columns.get_level_values(1)[0], axis=1, level=1)
    return frame.reset_index().rename(columns={"index": "Date", "Datetime": "Date"})


def _date_and_price_columns(frame: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Date (parsed, time-zone free) and the OHLCV columns, or DlpipeError naming what is missing."""
    missing = [c for c in ("Date", *PRICE_COLUMNS) if c not in frame.columns]
    if missing:
        raise DlpipeError(f"{origin}: missing column(s) {', '.join(missing)}")
    frame = frame[["Date", *PRICE_COLUMNS]].copy()
    frame["Date"] = pd.to_datetime(frame["Date"], errors="coerce").dt.tz_localize(None)
    if frame["Date"].isna().any():
        raise DlpipeError(f"{origin}: unparseable date in row {int(frame['Date'].isna().to_numpy().argmax())}")
    return frame


def validate_prices(frame: pd.DataFrame, origin: str, params: StocksParams, ticker: str) -> pd.DataFrame:
    """Normalise to Date + OHLCV, filter to [start, end], and reject data a model must not train on."""
    frame = _date_and_price_columns(frame, origin).sort_values("Date")
    if params.start:
        frame = frame[frame["Date"] >= pd.Timestamp(params.start)]
    if params.end:
        frame = frame[frame["Date"] < pd.Timestamp(params.end)]
    if frame["Date"].duplicated().any():
        raise DlpipeError(f"{origin}: duplicate date {frame.loc[frame['Date'].duplicated(), 'Date'].iloc[0].date()}")
    frame[list(PRICE_COLUMNS)] = check_price_values(frame, origin)
    if len(frame) < MIN_ROWS:
        raise DlpipeError(
            f"data.stocks: only {len(frame)} rows for {ticker!r} between start and end; need at least {MIN_ROWS}"
        )
    return frame.reset_index(drop=True)


def check_price_values(frame: pd.DataFrame, origin: str) -> pd.DataFrame:
    """The OHLCV columns as numbers, or DlpipeError naming the first row a model must not train on: a
    missing, non-numeric, infinite or non-positive price, High below Low, a negative volume."""
    values = frame[list(PRICE_COLUMNS)].apply(pd.to_numeric, errors="coerce")

    def first_date(bad: pd.Series) -> str:
        date = frame.loc[bad.to_numpy(), "Date"].iloc[0]
        return str(date.date()) if hasattr(date, "date") else str(date)

    for column in PRICE_COLUMNS:
        bad = ~np.isfinite(values[column].to_numpy(np.float64))
        if bad.any():
            raise DlpipeError(f"{origin}: missing, non-numeric or infinite {column} on {first_date(pd.Series(bad))}")
    prices = values[["Open", "High", "Low", "Close"]]
    if (non_positive := (prices <= 0).any(axis=1)).any():
        raise DlpipeError(f"{origin}: non-positive price on {first_date(non_positive)}")
    if (inverted := values["High"] < values["Low"]).any():
        raise DlpipeError(f"{origin}: High below Low on {first_date(inverted)}")
    if (negative := values["Volume"] < 0).any():
        raise DlpipeError(f"{origin}: negative volume on {first_date(negative)}")
    return values


def make_features(prices: pd.DataFrame) -> np.ndarray:
    """Per-day features (days 1..N-1), float32 (N-1, len(FEATURES)); row i describes day i+1."""
    close, high, low, open_ = (prices[c].to_numpy(np.float64) for c in ("Close", "High", "Low", "Open"))
    volume = prices["Volume"].to_numpy(np.float64)
    features = np.stack(
        [
            np.diff(np.log(close)),  # FEATURE_FORMULAS, in that order
            np.log(high / low)[1:],
            np.log(close / open_)[1:],
            np.diff(np.log1p(volume)),
        ],
        axis=1,
    )
    return features.astype(np.float32)


@dataclass(frozen=True)
class Windows:
    x: np.ndarray  # (N, window, F) float32: the features of the `window` days before the target day
    y: np.ndarray  # (N, 1) float32: the target day's close log return
    last_close: np.ndarray  # (N,) close on the window's last day: the persistence forecast
    next_close: np.ndarray  # (N,) the close to predict
    dates: np.ndarray  # (N,) date of the predicted close
    target_days: np.ndarray  # (N,) int: row of the predicted day in the price table
    ticker: np.ndarray  # (N,) int: index of the ticker (in the fetched order) the window belongs to

    def __len__(self) -> int:
        return len(self.y)


def part_bounds(n_days: int) -> dict[str, tuple[int, int]]:
    """Each split's days [first, end) of a price table of `n_days` rows, oldest first."""
    train_end = int(n_days * SPLIT_FRACTIONS["train"])
    val_end = train_end + int(n_days * SPLIT_FRACTIONS["val"])
    return {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, n_days)}


def make_windows(prices: pd.DataFrame, window: int, days: tuple[int, int] | None = None, ticker: int = 0) -> Windows:
    """Every window whose days all lie in `days` [first, end) (default: the whole table).

    The sample for target day d reads the features of days d-window .. d-1; each of them is a change from
    the day before, so the earliest close it touches is day d-window-1. Requiring that close to lie in
    `days` too keeps the windows of one split from reading another split's days: consecutive splits are
    separated by window+1 target days, and no input ever comes from the target day or later.
    """
    first, end = days if days is not None else (0, len(prices))
    features = make_features(prices)  # row j describes day j+1
    close = prices["Close"].to_numpy(np.float64)
    dates = prices["Date"].to_numpy()
    target_days = np.arange(first + window + 1, end)
    if len(target_days) < MIN_SPLIT_SAMPLES:
        raise DlpipeError(
            f"train.*.window: window {window} leaves {len(target_days)} samples from {end - first} days"
            f" (need at least {MIN_SPLIT_SAMPLES})"
        )
    starts = target_days - window - 1  # feature row of day d-window
    x = np.lib.stride_tricks.sliding_window_view(features, window, axis=0)[starts].transpose(0, 2, 1)
    return Windows(
        x=np.ascontiguousarray(x, dtype=np.float32),
        y=features[target_days - 1, 0:1].copy(),
        last_close=close[target_days - 1],
        next_close=close[target_days],
        dates=dates[target_days],
        target_days=target_days,
        ticker=np.full(len(target_days), ticker, dtype=np.int64),
    )


def split_windows(prices: pd.DataFrame, window: int, ticker: int = 0, name: str = "") -> dict[str, Windows]:
    """The train, val and test windows of one ticker, each inside its own chronological part."""
    splits = {}
    for split, days in part_bounds(len(prices)).items():
        try:
            splits[split] = make_windows(prices, window, days, ticker)
        except DlpipeError as exc:
            raise DlpipeError(f"{exc} in the {split} split of {name or 'the prices'}") from None
    return splits


def concatenate(parts: list[Windows]) -> Windows:
    """Windows of several tickers as one set (the fields concatenated in order)."""
    fields = Windows.__dataclass_fields__
    return Windows(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in fields})


def ticker_inputs(windows: Windows, n_tickers: int) -> np.ndarray:
    """The model's input: the window's features followed by one column per ticker, 1 on every day for the
    window's own ticker and 0 for the others (float32, (N, window, F + n_tickers))."""
    one_hot = np.eye(n_tickers, dtype=np.float32)[windows.ticker]  # (N, K)
    repeated = np.broadcast_to(one_hot[:, None, :], (len(windows), windows.x.shape[1], n_tickers))
    return np.concatenate([windows.x, repeated], axis=2)


def forecast_input(
    prices: pd.DataFrame, window: int, ticker: int, n_tickers: int, origin: str
) -> tuple[np.ndarray, float, pd.Timestamp]:
    """The input that forecasts the trading day after the last row of `prices` (Date + OHLCV, any order),
    built as the training and test windows are: (1, window, F + n_tickers) float32, with the last close
    (the persistence forecast) and the last date. Needs window + 1 days (features are day-to-day changes);
    older rows are ignored. DlpipeError names the first problem (`origin` says where the rows came from)."""
    frame = _date_and_price_columns(prices, origin).sort_values("Date")
    if frame["Date"].duplicated().any():
        raise DlpipeError(f"{origin}: duplicate date {frame.loc[frame['Date'].duplicated(), 'Date'].iloc[0].date()}")
    if len(frame) < window + 1:
        raise DlpipeError(
            f"{origin}: {len(frame)} days given; the model needs the last {window + 1} (window {window} + 1)"
        )
    frame = frame.iloc[-(window + 1) :].reset_index(drop=True)
    for column in PRICE_COLUMNS:  # what pd.to_numeric would take as a number, or fail on, but a price is not
        if frame[column].map(lambda value: isinstance(value, bool | np.bool_)).any():
            raise DlpipeError(f"{origin}: {column} holds true/false, not a number")
        try:
            pd.to_numeric(frame[column], errors="coerce")
        except OverflowError:  # an integer of hundreds of digits (JSON or CSV)
            raise DlpipeError(f"{origin}: {column} holds a number too large to be a price or volume") from None
    frame[list(PRICE_COLUMNS)] = check_price_values(frame, origin)
    features = make_features(frame)  # (window, F): the same formulas as every training window
    last = Windows(
        x=features[None],
        y=np.zeros((1, 1), np.float32),
        last_close=frame["Close"].to_numpy(np.float64)[-1:],
        next_close=np.full(1, np.nan),
        dates=frame["Date"].to_numpy()[-1:],
        target_days=np.array([len(frame)]),
        ticker=np.array([ticker], dtype=np.int64),
    )
    return ticker_inputs(last, n_tickers), float(last.last_close[0]), frame["Date"].iloc[-1]


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = first_line(exc)
        raise DlpipeError(f"{path}: not a readable price CSV ({first})") from exc


STOCK_META_KEYS = ("sha256", "tickers", "files", "source")  # what later stages read from fetch_stocks' meta.json


def read_stock_meta(raw_dir: Path) -> dict:
    return read_json(raw_dir / "meta.json", required=STOCK_META_KEYS)


def read_prices(raw_dir: Path, ticker: str) -> pd.DataFrame:
    """The prices of `ticker` fetch_stocks wrote, checked against the sha256 in its meta.json and
    re-validated, so an edited or damaged file is refused by name instead of training a NaN model."""
    meta = read_stock_meta(raw_dir)
    if ticker not in meta["files"]:
        raise DlpipeError(f"{raw_dir / 'meta.json'}: no prices for {ticker!r} (fetched: {', '.join(meta['files'])})")
    path = raw_dir / meta["files"][ticker]["file"]
    if not path.is_file():
        raise DlpipeError(f"{path}: file not found (run fetch_stocks first)")
    expected = meta["files"][ticker]["sha256"]
    if sha256_file(path) != expected:
        raise DlpipeError(f"{path}: changed since fetch_stocks wrote it (sha256 differs from meta.json); rerun it")
    frame = _date_and_price_columns(_read_csv(path), str(path))
    frame[list(PRICE_COLUMNS)] = check_price_values(frame, str(path))
    return frame


@dataclass(frozen=True)
class StockData:
    """Every fetched ticker's prices and its train/val/test windows for one window length."""

    tickers: list[str]  # in fetch order: the order of the model's ticker columns
    prices: dict[str, pd.DataFrame]
    splits: dict[str, dict[str, Windows]]  # ticker -> split -> windows

    def pooled(self, split: str) -> Windows:
        return concatenate([self.splits[ticker][split] for ticker in self.tickers])


def load_stock_data(raw_dir: Path, window: int) -> StockData:
    tickers = list(read_stock_meta(raw_dir)["tickers"])
    prices = {ticker: read_prices(raw_dir, ticker) for ticker in tickers}
    splits = {ticker: split_windows(prices[ticker], window, i, ticker) for i, ticker in enumerate(tickers)}
    return StockData(tickers, prices, splits)
