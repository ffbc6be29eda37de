"""Stock prices: the committed samples, validation, yfinance (stubbed, recorded-style frames),
features, windows and the chronological split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT
from dlpipe.config import StocksParams
from dlpipe.data.stocks import (
    FEATURES,
    MIN_ROWS,
    PRICE_COLUMNS,
    download_yfinance,
    make_features,
    make_windows,
    read_sample,
    split_chronological,
    validate_prices,
)
from dlpipe.errors import DlpipeError

SAMPLES = REPO_ROOT / "data" / "samples"


def params(
    ticker: str = "GOOG", source: str = "sample", start: str | None = None, end: str | None = None
) -> StocksParams:
    return StocksParams(source=source, ticker=ticker, start=start, end=end)


def synthetic_prices(rows: int = 80, seed: int = 0, start: str = "2021-01-04") -> pd.DataFrame:
    """Plausible daily OHLCV on business days: a random walk with Low <= Open, Close <= High."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.015, rows)))
    open_ = close * np.exp(rng.normal(0.0, 0.005, rows))
    high = np.maximum(open_, close) * (1.0 + rng.uniform(0.001, 0.02, rows))
    low = np.minimum(open_, close) * (1.0 - rng.uniform(0.001, 0.02, rows))
    volume = rng.integers(1_000_000, 5_000_000, rows)
    dates = pd.bdate_range(start, periods=rows)
    return pd.DataFrame(
        {"Date": dates.strftime("%Y-%m-%d"), "Open": open_, "High": high, "Low": low, "Close": close, "Volume": volume}
    )


def assert_one_line_error(info: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------- committed samples


@pytest.fixture(scope="module")
def goog() -> pd.DataFrame:
    return validate_prices(read_sample(SAMPLES, params()), "GOOG.csv", params())


def test_read_sample_goog():
    frame = read_sample(SAMPLES, params())
    assert list(frame.columns) == ["Date", *PRICE_COLUMNS]  # the unnamed first column becomes Date
    assert len(frame) == 2148
    assert frame["Date"].iloc[0] == "2004-08-19"
    assert frame["Close"].iloc[0] == pytest.approx(100.34)


def test_validate_goog_sample(goog):
    assert list(goog.columns) == ["Date", "Open", "High", "Low", "Close", "Volume"]
    assert len(goog) == 2148
    assert pd.api.types.is_datetime64_any_dtype(goog["Date"])
    assert goog["Date"].is_monotonic_increasing
    assert goog["Date"].is_unique
    assert goog["Date"].iloc[0] == pd.Timestamp("2004-08-19")
    assert goog["Date"].iloc[-1] == pd.Timestamp("2013-03-01")
    assert list(goog.index) == list(range(2148))
    for column in PRICE_COLUMNS:
        assert pd.api.types.is_numeric_dtype(goog[column])
    assert (goog[["Open", "High", "Low", "Close"]] > 0).all().all()
    assert (goog["High"] >= goog["Low"]).all()


def test_ticker_is_case_insensitive():
    assert len(read_sample(SAMPLES, params("goog"))) == 2148


def test_start_end_filter():
    p = params(start="2010-01-01", end="2011-01-01")
    frame = validate_prices(read_sample(SAMPLES, p), "GOOG.csv", p)
    assert frame["Date"].min() == pd.Timestamp("2010-01-04")  # first trading day of 2010
    assert frame["Date"].max() == pd.Timestamp("2010-12-31")
    assert len(frame) == 252
    assert list(frame.index) == list(range(252))


def test_end_is_exclusive_and_start_inclusive(goog):
    day = goog["Date"].iloc[1000]
    p = params(start=str(day.date()), end=str(goog["Date"].iloc[1100].date()))
    frame = validate_prices(read_sample(SAMPLES, p), "GOOG.csv", p)
    assert frame["Date"].iloc[0] == day
    assert len(frame) == 100


def test_filter_leaving_too_few_rows():
    p = params(start="2010-01-01", end="2010-02-01")  # about 20 trading days
    with pytest.raises(DlpipeError) as info:
        validate_prices(read_sample(SAMPLES, p), "GOOG.csv", p)
    assert_one_line_error(info, "only 19 rows", "'GOOG'", f"at least {MIN_ROWS}")


def test_unknown_ticker_lists_available():
    with pytest.raises(DlpipeError) as info:
        read_sample(SAMPLES, params("AAPL"))
    assert_one_line_error(info, "data.stocks.ticker", "'AAPL'", "GOOG", "MSFT")


# ---------------------------------------------------------------- validation errors


def test_synthetic_frame_is_valid():
    frame = validate_prices(synthetic_prices(), "synthetic", params("TEST"))
    assert len(frame) == 80
    assert frame["Date"].is_monotonic_increasing


def test_unsorted_input_is_sorted():
    shuffled = synthetic_prices().sample(frac=1.0, random_state=0)
    frame = validate_prices(shuffled, "synthetic", params("TEST"))
    assert frame["Date"].is_monotonic_increasing
    expected = synthetic_prices()
    np.testing.assert_allclose(frame["Close"].to_numpy(), expected["Close"].to_numpy())


def test_extra_columns_dropped():
    frame = synthetic_prices()
    frame["Adj Close"] = frame["Close"]
    frame["OpenInt"] = 0
    assert list(validate_prices(frame, "x", params("TEST")).columns) == ["Date", *PRICE_COLUMNS]


@pytest.mark.parametrize("column", ["Date", "Close", "Volume"])
def test_missing_column(column):
    frame = synthetic_prices().drop(columns=[column])
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, "prices.csv", "missing column", column)


def test_missing_columns_all_named():
    frame = synthetic_prices().drop(columns=["Open", "Low"])
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, "Open", "Low")
    assert "Close" not in str(info.value)


@pytest.mark.parametrize("column,value", [("Close", 0.0), ("Low", -1.5), ("Open", 0.0), ("High", -3.0)])
def test_non_positive_price(column, value):
    frame = synthetic_prices()
    frame.loc[30, column] = value
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, "prices.csv", "non-positive price", frame.loc[30, "Date"])


def test_negative_volume():
    frame = synthetic_prices()
    frame.loc[12, "Volume"] = -100
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, "prices.csv", "negative volume")


def test_zero_volume_is_allowed():
    frame = synthetic_prices()
    frame.loc[12, "Volume"] = 0
    assert validate_prices(frame, "x", params("TEST"))["Volume"].iloc[12] == 0


def test_duplicate_date():
    frame = synthetic_prices()
    frame.loc[40, "Date"] = frame.loc[39, "Date"]
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, "prices.csv", "duplicate date", frame.loc[39, "Date"])


def test_duplicate_outside_the_range_is_ignored():
    frame = synthetic_prices(rows=100)
    frame.loc[1, "Date"] = frame.loc[0, "Date"]
    kept = validate_prices(frame, "x", params("TEST", start=frame.loc[5, "Date"]))
    assert len(kept) == 95


def test_too_few_rows():
    frame = synthetic_prices(rows=MIN_ROWS - 1)
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, f"only {MIN_ROWS - 1} rows", "'TEST'", f"at least {MIN_ROWS}")
    assert len(validate_prices(synthetic_prices(rows=MIN_ROWS), "x", params("TEST"))) == MIN_ROWS


@pytest.mark.parametrize("bad", ["not a date", "2021-02-30", ""])
def test_unparseable_date(bad):
    frame = synthetic_prices()
    frame.loc[7, "Date"] = bad
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, "prices.csv", "unparseable date in row 7")


@pytest.mark.parametrize("column", ["Close", "Volume"])
def test_non_numeric_value(column):
    frame = synthetic_prices().astype({column: object})
    frame.loc[20, column] = "n/a"
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, "prices.csv", "missing, non-numeric or infinite", column)


def test_missing_price_value():
    frame = synthetic_prices()
    frame.loc[20, "High"] = np.nan
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"))
    assert_one_line_error(info, "missing, non-numeric or infinite High")


# ---------------------------------------------------------------- yfinance (stubbed)


def yfinance_frame(ticker: str = "MSFT", rows: int = 80) -> pd.DataFrame:
    """What yfinance 1.x `download(ticker, auto_adjust=True)` returns for one ticker: DatetimeIndex named
    Date, MultiIndex columns (Price, Ticker) in the field order Close, High, Low, Open, Volume."""
    plain = synthetic_prices(rows=rows, seed=11, start="2024-03-01")
    index = pd.DatetimeIndex(pd.to_datetime(plain["Date"]), name="Date")
    fields = ["Close", "High", "Low", "Open", "Volume"]
    columns = pd.MultiIndex.from_tuples([(field, ticker) for field in fields], names=["Price", "Ticker"])
    values = np.column_stack([plain[f].to_numpy(np.float64) for f in fields[:4]] + [plain["Volume"].to_numpy()])
    frame = pd.DataFrame(values, index=index, columns=columns)
    return frame.astype({("Volume", ticker): np.int64})


@pytest.fixture
def yf_calls(monkeypatch):
    """Replaces yfinance.download; tests set `response` (a frame or an exception) and read `calls`."""
    import yfinance

    state = {"calls": [], "response": yfinance_frame()}

    def fake_download(tickers, **kwargs):
        state["calls"].append((tickers, kwargs))
        if isinstance(state["response"], BaseException):
            raise state["response"]
        return state["response"]

    monkeypatch.setattr(yfinance, "download", fake_download)
    return state


def test_recorded_style_frame_shape():
    # The fixture itself matches yfinance 1.x's layout.
    frame = yfinance_frame()
    assert frame.columns.names == ["Price", "Ticker"]
    assert frame.index.name == "Date"
    assert list(frame.columns.get_level_values(0)) == ["Close", "High", "Low", "Open", "Volume"]


def test_download_yfinance_clean_frame(yf_calls):
    p = params("MSFT", source="yfinance", start="2024-01-01", end="2025-01-01")
    raw = download_yfinance(p)
    assert yf_calls["calls"] == [
        (
            "MSFT",
            {
                "start": "2024-01-01",
                "end": "2025-01-01",
                "interval": "1d",
                "auto_adjust": True,
                "progress": False,
                "threads": False,
            },
        )
    ]
    assert "Date" in raw.columns
    assert set(PRICE_COLUMNS) <= set(raw.columns)

    frame = validate_prices(raw, "yfinance MSFT", p)

    expected = synthetic_prices(rows=80, seed=11, start="2024-03-01")
    assert list(frame.columns) == ["Date", *PRICE_COLUMNS]
    assert len(frame) == 80
    assert frame["Date"].iloc[0] == pd.Timestamp("2024-03-01")
    assert frame["Date"].is_monotonic_increasing
    for column in ("Open", "High", "Low", "Close"):
        np.testing.assert_allclose(frame[column].to_numpy(), expected[column].to_numpy())
    np.testing.assert_array_equal(frame["Volume"].to_numpy(), expected["Volume"].to_numpy())


def test_download_yfinance_tz_aware_index(yf_calls):
    frame = yfinance_frame()
    frame.index = frame.index.tz_localize("America/New_York")
    yf_calls["response"] = frame
    p = params("MSFT", source="yfinance")
    clean = validate_prices(download_yfinance(p), "yfinance", p)
    assert clean["Date"].dt.tz is None
    assert clean["Date"].iloc[0] == pd.Timestamp("2024-03-01")


def test_download_yfinance_flat_columns(yf_calls):
    # Older yfinance (and multi_level_index=False) return flat columns.
    frame = yfinance_frame()
    frame.columns = frame.columns.get_level_values(0)
    yf_calls["response"] = frame
    p = params("MSFT", source="yfinance")
    assert len(validate_prices(download_yfinance(p), "yfinance", p)) == 80


def test_download_yfinance_empty(yf_calls):
    empty = yfinance_frame().iloc[:0]
    yf_calls["response"] = empty
    with pytest.raises(DlpipeError) as info:
        download_yfinance(params("NOSUCHTICKER", source="yfinance", start="2024-01-01", end="2024-02-01"))
    assert_one_line_error(info, "data.stocks.ticker", "'NOSUCHTICKER'", "no rows", "2024-01-01")


def test_download_yfinance_none(yf_calls):
    yf_calls["response"] = None
    with pytest.raises(DlpipeError, match="'ZZZ'"):
        download_yfinance(params("ZZZ", source="yfinance"))


def test_download_yfinance_exception(yf_calls):
    yf_calls["response"] = ConnectionError("Failed to resolve 'query2.finance.yahoo.com'")
    with pytest.raises(DlpipeError) as info:
        download_yfinance(params("MSFT", source="yfinance"))
    assert_one_line_error(info, "'MSFT'", "failed", "ConnectionError", "query2.finance.yahoo.com")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_download_yfinance_bad_rows_caught_by_validation(yf_calls):
    frame = yfinance_frame()
    frame.iloc[10, frame.columns.get_loc(("Close", "MSFT"))] = np.nan  # a partially filled day
    yf_calls["response"] = frame
    p = params("MSFT", source="yfinance")
    with pytest.raises(DlpipeError, match="missing, non-numeric or infinite Close"):
        validate_prices(download_yfinance(p), "yfinance MSFT", p)


# ---------------------------------------------------------------- features, windows, split


def test_make_features(goog):
    features = make_features(goog)
    assert features.shape == (2147, len(FEATURES))
    assert features.dtype == np.float32
    close, high, low, open_ = (goog[c].to_numpy() for c in ("Close", "High", "Low", "Open"))
    day = 500  # feature row 499 describes day 500
    assert features[day - 1, 0] == pytest.approx(np.log(close[day] / close[day - 1]), abs=1e-6)
    assert features[day - 1, 1] == pytest.approx(np.log(high[day] / low[day]), abs=1e-6)
    assert features[day - 1, 2] == pytest.approx(np.log(close[day] / open_[day]), abs=1e-6)
    assert np.isfinite(features).all()


@pytest.mark.parametrize("window", [5, 30])
def test_make_windows(goog, window):
    windows = make_windows(goog, window)
    n = len(goog) - 1 - window
    assert windows.x.shape == (n, window, len(FEATURES))
    assert windows.x.dtype == np.float32
    assert windows.y.shape == (n, 1)
    assert windows.y.dtype == np.float32
    assert windows.last_close.shape == windows.next_close.shape == windows.dates.shape == (n,)

    close = goog["Close"].to_numpy()
    dates = goog["Date"].to_numpy()
    for i in (0, 1, n // 2, n - 1):
        # The target: next-day close log return, and the day it belongs to.
        assert windows.y[i, 0] == pytest.approx(np.log(windows.next_close[i] / windows.last_close[i]), abs=1e-6)
        day = np.flatnonzero(dates == windows.dates[i])[0]
        assert windows.next_close[i] == close[day]
        assert windows.last_close[i] == close[day - 1]
        # The window ends on the day before the target day: no look-ahead.
        assert windows.x[i, -1, 0] == pytest.approx(np.log(windows.last_close[i] / close[day - 2]), abs=1e-6)
        assert windows.x[i, 0, 0] == pytest.approx(np.log(close[day - window] / close[day - window - 1]), abs=1e-6)
    # Consecutive windows slide by one day.
    np.testing.assert_array_equal(windows.x[1, :-1], windows.x[0, 1:])
    np.testing.assert_array_equal(windows.last_close[1:], windows.next_close[:-1])
    assert windows.dates[-1] == dates[-1]
    assert windows.dates[0] == dates[window + 1]


def test_make_windows_too_long(goog):
    with pytest.raises(DlpipeError, match=r"train\.\*\.window"):
        make_windows(goog.iloc[:40], 35)
    assert len(make_windows(goog.iloc[:40], 29).y) == 10  # the smallest count accepted


def test_split_chronological(goog):
    windows = make_windows(goog, 10)
    splits = split_chronological(windows)
    assert list(splits) == ["train", "val", "test"]
    n = len(windows.y)
    sizes = {name: len(w.y) for name, w in splits.items()}
    assert sum(sizes.values()) == n
    assert sizes["train"] == int(n * 0.7)
    assert sizes["val"] == int(n * 0.15)
    for w in splits.values():
        assert len(w.x) == len(w.y) == len(w.last_close) == len(w.next_close) == len(w.dates)
    assert splits["train"].dates.max() < splits["val"].dates.min()
    assert splits["val"].dates.max() < splits["test"].dates.min()
    # Contiguous and in order: concatenated back, the splits are the original windows.
    np.testing.assert_array_equal(np.concatenate([w.dates for w in splits.values()]), windows.dates)
    np.testing.assert_array_equal(np.concatenate([w.x for w in splits.values()]), windows.x)
    np.testing.assert_array_equal(np.concatenate([w.y for w in splits.values()]), windows.y)
