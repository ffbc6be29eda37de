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
from dlpipe.errors import DlpipeError
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
# Chronological split of the windows: the model never trains on days after those it is evaluated on.
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def read_sample(samples_dir: Path, params: StocksParams) -> pd.DataFrame:
    path = samples_dir / "stocks" / f"{params.ticker.upper()}.csv"
    if not path.is_file():
        available = sorted(p.stem for p in (samples_dir / "stocks").glob("*.csv"))
        raise DlpipeError(f"data.stocks.ticker: no committed sample for {params.ticker!r} (available: {', '.join(available)})")
    frame = _read_csv(path)
    frame = frame.rename(columns={frame.columns[0]: "Date"})
    return frame


def _iso(day) -> str | None:
    return day.isoformat() if day else None


def download_yfinance(params: StocksParams) -> pd.DataFrame:
    import yfinance as yf

    try:
        frame = yf.download(params.ticker, start=_iso(params.start), end=_iso(params.end), interval="1d", auto_adjust=True, progress=False, threads=False)
    except Exception as exc:  # noqa: BLE001 - transport errors become one clear line
        raise DlpipeError(f"yfinance download of {params.ticker!r} failed: {type(exc).__name__}: {exc}") from exc
    if frame is None or frame.empty:
        raise DlpipeError(f"data.stocks.ticker: yfinance returned no rows for {params.ticker!r} ({params.start}..{params.end})")
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


def validate_prices(frame: pd.DataFrame, origin: str, params: StocksParams) -> pd.DataFrame:
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
        raise DlpipeError(f"data.stocks: only {len(frame)} rows for {params.ticker!r} between start and end; need at least {MIN_ROWS}")
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
    x: np.ndarray  # (N, window, F) float32
    y: np.ndarray  # (N, 1) float32: next-day close log return
    last_close: np.ndarray  # (N,) close on the window's last day: the persistence forecast
    next_close: np.ndarray  # (N,) the close to predict
    dates: np.ndarray  # (N,) date of the predicted close


def make_windows(prices: pd.DataFrame, window: int) -> Windows:
    features = make_features(prices)
    close = prices["Close"].to_numpy(np.float64)
    dates = prices["Date"].to_numpy()
    count = len(features) - window  # window of feature rows [i, i+window) predicts feature row i+window
    if count < 10:
        raise DlpipeError(f"train.*.window: window {window} leaves {max(count, 0)} samples from {len(prices)} days")
    x = np.lib.stride_tricks.sliding_window_view(features, window, axis=0)[:count].transpose(0, 2, 1)
    targets = np.arange(count) + window  # feature row index of the predicted day
    return Windows(
        x=np.ascontiguousarray(x, dtype=np.float32),
        y=features[targets, 0:1].copy(),
        last_close=close[targets],  # feature row j is day j+1, so day `targets` is the window's last day
        next_close=close[targets + 1],
        dates=dates[targets + 1],
    )


def split_chronological(windows: Windows) -> dict[str, Windows]:
    n = len(windows.y)
    train_end = int(n * SPLIT_FRACTIONS["train"])
    val_end = train_end + int(n * SPLIT_FRACTIONS["val"])
    bounds = {"train": slice(0, train_end), "val": slice(train_end, val_end), "test": slice(val_end, n)}
    return {
        name: Windows(windows.x[s], windows.y[s], windows.last_close[s], windows.next_close[s], windows.dates[s])
        for name, s in bounds.items()
    }


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DlpipeError(f"{path}: not a readable price CSV ({first})") from exc


def read_prices(path: Path) -> pd.DataFrame:
    """The prices fetch_stocks wrote, checked against the sha256 in its meta.json and re-validated, so an
    edited or damaged file is refused by name instead of training a NaN model."""
    if not path.is_file():
        raise DlpipeError(f"{path}: file not found (run fetch_stocks first)")
    expected = read_json(path.parent / "meta.json", required=("sha256",))["sha256"]
    if sha256_file(path) != expected:
        raise DlpipeError(f"{path}: changed since fetch_stocks wrote it (sha256 differs from meta.json); rerun it")
    frame = _date_and_price_columns(_read_csv(path), str(path))
    frame[list(PRICE_COLUMNS)] = check_price_values(frame, str(path))
    return frame
