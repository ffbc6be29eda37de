"""Stock prices: the committed samples, validation, yfinance (stubbed, recorded-style frames), the
tickers parameter, features, windows, the per-part chronological split, and the no-look-ahead rules."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from conftest import REPO_ROOT, tiny_params, write_project
from dlpipe.config import StocksParams, load_config
from dlpipe.data.datamodules import StockWindowDataModule
from dlpipe.data.stocks import (
    FEATURES,
    MIN_ROWS,
    MIN_SPLIT_SAMPLES,
    PRICE_COLUMNS,
    Windows,
    concatenate,
    download_yfinance,
    load_stock_data,
    make_features,
    make_windows,
    part_bounds,
    read_prices,
    read_sample,
    split_windows,
    ticker_inputs,
    validate_prices,
)
from dlpipe.errors import DlpipeError
from dlpipe.io import read_json, sha256_file, write_json
from dlpipe.stages import fetch_stocks

SAMPLES = REPO_ROOT / "data" / "samples"


def params(
    ticker: str = "GOOG", source: str = "sample", start: str | None = None, end: str | None = None
) -> StocksParams:
    return StocksParams(source=source, tickers=[ticker], start=start, end=end)


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


def sample(ticker: str) -> pd.DataFrame:
    return validate_prices(read_sample(SAMPLES, ticker), f"{ticker}.csv", params(ticker), ticker)


@pytest.fixture(scope="module")
def goog() -> pd.DataFrame:
    return sample("GOOG")


@pytest.fixture(scope="module")
def msft() -> pd.DataFrame:
    return sample("MSFT")


def test_read_sample_goog():
    frame = read_sample(SAMPLES, "GOOG")
    assert list(frame.columns) == ["Date", *PRICE_COLUMNS]  # the unnamed first column becomes Date
    assert len(frame) == 2148
    assert frame["Date"].iloc[0] == "2004-08-19"
    assert frame["Close"].iloc[0] == pytest.approx(100.34)


def test_read_sample_msft(msft):
    frame = read_sample(SAMPLES, "MSFT")
    assert {"Date", *PRICE_COLUMNS} <= set(frame.columns)
    assert list(msft.columns) == ["Date", *PRICE_COLUMNS]  # validation keeps only these
    assert len(msft) == len(frame)
    assert msft["Date"].is_monotonic_increasing and msft["Date"].is_unique
    # A different stock: not the GOOG file under another name.
    assert frame["Close"].iloc[0] != pytest.approx(100.34)


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
    # StocksParams upper-cases the symbol; read_sample then finds the capitalised file.
    (ticker,) = params("goog").tickers
    assert ticker == "GOOG"
    assert len(read_sample(SAMPLES, ticker)) == 2148


def test_start_end_filter():
    p = params(start="2010-01-01", end="2011-01-01")
    frame = validate_prices(read_sample(SAMPLES, "GOOG"), "GOOG.csv", p, "GOOG")
    assert frame["Date"].min() == pd.Timestamp("2010-01-04")  # first trading day of 2010
    assert frame["Date"].max() == pd.Timestamp("2010-12-31")
    assert len(frame) == 252
    assert list(frame.index) == list(range(252))


def test_end_is_exclusive_and_start_inclusive(goog):
    day = goog["Date"].iloc[1000]
    p = params(start=str(day.date()), end=str(goog["Date"].iloc[1100].date()))
    frame = validate_prices(read_sample(SAMPLES, "GOOG"), "GOOG.csv", p, "GOOG")
    assert frame["Date"].iloc[0] == day
    assert len(frame) == 100


def test_filter_leaving_too_few_rows():
    p = params(start="2010-01-01", end="2010-02-01")  # about 20 trading days
    with pytest.raises(DlpipeError) as info:
        validate_prices(read_sample(SAMPLES, "GOOG"), "GOOG.csv", p, "GOOG")
    assert_one_line_error(info, "only 19 rows", "'GOOG'", f"at least {MIN_ROWS}")


def test_too_few_rows_names_the_ticker_being_validated():
    p = StocksParams(source="sample", tickers=["GOOG", "MSFT"], start="2010-01-01", end="2010-02-01")
    with pytest.raises(DlpipeError) as info:
        validate_prices(read_sample(SAMPLES, "MSFT"), "MSFT.csv", p, "MSFT")
    assert_one_line_error(info, "'MSFT'")
    assert "GOOG" not in str(info.value)


def test_unknown_ticker_lists_available():
    with pytest.raises(DlpipeError) as info:
        read_sample(SAMPLES, "AAPL")
    assert_one_line_error(info, "data.stocks.tickers", "'AAPL'", "GOOG", "MSFT")


# ---------------------------------------------------------------- the tickers parameter


def test_tickers_are_upper_cased_in_order():
    p = StocksParams(source="sample", tickers=["msft", "Goog", "BRK.B"])
    assert p.tickers == ["MSFT", "GOOG", "BRK.B"]


def test_duplicate_ticker_rejected():
    with pytest.raises(ValidationError, match="listed twice"):
        StocksParams(source="sample", tickers=["GOOG", "MSFT", "goog"])


def test_old_ticker_key_rejected_with_the_new_name():
    with pytest.raises(ValidationError, match="`ticker` is now `tickers`"):
        StocksParams(source="sample", ticker="GOOG")


def test_empty_tickers_rejected():
    with pytest.raises(ValidationError, match="tickers"):
        StocksParams(source="sample", tickers=[])


@pytest.mark.parametrize(
    "change,fragments",
    [
        (lambda s: (s.pop("tickers"), s.update(ticker="GOOG")), ["data.stocks", "`ticker` is now `tickers`"]),
        (lambda s: s.update(tickers=["GOOG", "goog"]), ["data.stocks.tickers", "listed twice"]),
        (lambda s: s.update(tickers=[]), ["data.stocks.tickers"]),
        (lambda s: s.update(tickers="GOOG"), ["data.stocks.tickers"]),  # a list, not one symbol
    ],
)
def test_tickers_errors_from_params_yaml(tmp_path, change, fragments):
    p = tiny_params()
    change(p["data"]["stocks"])
    with pytest.raises(DlpipeError) as info:
        load_config(write_project(tmp_path / "project", p))
    assert_one_line_error(info, "params.yaml", *fragments)


# ---------------------------------------------------------------- fetch_stocks: every ticker or nothing


def test_fetch_stocks_writes_every_ticker(config):
    meta = fetch_stocks(config)
    raw = config.paths.raw_stocks
    assert meta == read_json(raw / "meta.json")
    assert meta["tickers"] == ["GOOG", "MSFT"]
    assert meta["source"] == "sample"
    assert set(meta["files"]) == {"GOOG", "MSFT"}
    for ticker, entry in meta["files"].items():
        assert entry["file"] == f"{ticker}.csv"
        assert entry["sha256"] == sha256_file(raw / entry["file"])
        assert entry["origin"] == f"data/samples/stocks/{ticker}.csv"
        prices = read_prices(raw, ticker)
        assert entry["rows"] == len(prices)
        assert entry["first_date"] == "2008-01-02"  # data.stocks.start is 2008-01-01 in the tiny project
        assert entry["last_date"] == str(prices["Date"].iloc[-1].date())
        expected = validate_prices(read_sample(SAMPLES, ticker), ticker, config.params.data.stocks, ticker)
        np.testing.assert_array_equal(prices[list(PRICE_COLUMNS)].to_numpy(), expected[list(PRICE_COLUMNS)].to_numpy())
    # The dataset's hash changes when any one file does.
    assert (
        meta["sha256"]
        == hashlib.sha256((meta["files"]["GOOG"]["sha256"] + meta["files"]["MSFT"]["sha256"]).encode()).hexdigest()
    )


def test_fetch_stocks_all_or_nothing(tmp_path):
    p = tiny_params()
    p["data"]["stocks"]["tickers"] = ["GOOG", "ZZZZ"]
    config = load_config(write_project(tmp_path / "project", p))
    with pytest.raises(DlpipeError) as info:
        fetch_stocks(config)
    assert_one_line_error(info, "data.stocks.tickers", "'ZZZZ'")
    assert not config.paths.raw_stocks.exists()  # GOOG was valid but is not written alone


def test_failed_fetch_keeps_the_previous_prices(tmp_path):
    project = write_project(tmp_path / "project", tiny_params())
    before = fetch_stocks(load_config(project))
    p = tiny_params()
    p["data"]["stocks"]["tickers"] = ["MSFT", "ZZZZ"]
    config = load_config(write_project(tmp_path / "project", p))
    with pytest.raises(DlpipeError):
        fetch_stocks(config)
    assert read_json(config.paths.raw_stocks / "meta.json") == before
    assert sorted(path.name for path in config.paths.raw_stocks.iterdir()) == ["GOOG.csv", "MSFT.csv", "meta.json"]


def test_read_prices_refuses_an_edited_file(config):
    fetch_stocks(config)
    path = config.paths.raw_stocks / "GOOG.csv"
    path.write_text(path.read_text().replace("\n2008-01-03,", "\n2008-01-03,1", 1))
    with pytest.raises(DlpipeError) as info:
        read_prices(config.paths.raw_stocks, "GOOG")
    assert_one_line_error(info, "GOOG.csv", "changed since fetch_stocks")
    with pytest.raises(DlpipeError) as info:
        read_prices(config.paths.raw_stocks, "AAPL")
    assert_one_line_error(info, "'AAPL'", "GOOG, MSFT")


# ---------------------------------------------------------------- validation errors


def test_synthetic_frame_is_valid():
    frame = validate_prices(synthetic_prices(), "synthetic", params("TEST"), "TEST")
    assert len(frame) == 80
    assert frame["Date"].is_monotonic_increasing


def test_unsorted_input_is_sorted():
    shuffled = synthetic_prices().sample(frac=1.0, random_state=0)
    frame = validate_prices(shuffled, "synthetic", params("TEST"), "TEST")
    assert frame["Date"].is_monotonic_increasing
    expected = synthetic_prices()
    np.testing.assert_allclose(frame["Close"].to_numpy(), expected["Close"].to_numpy())


def test_extra_columns_dropped():
    frame = synthetic_prices()
    frame["Adj Close"] = frame["Close"]
    frame["OpenInt"] = 0
    assert list(validate_prices(frame, "x", params("TEST"), "TEST").columns) == ["Date", *PRICE_COLUMNS]


@pytest.mark.parametrize("column", ["Date", "Close", "Volume"])
def test_missing_column(column):
    frame = synthetic_prices().drop(columns=[column])
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
    assert_one_line_error(info, "prices.csv", "missing column", column)


def test_missing_columns_all_named():
    frame = synthetic_prices().drop(columns=["Open", "Low"])
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
    assert_one_line_error(info, "Open", "Low")
    assert "Close" not in str(info.value)


@pytest.mark.parametrize("column,value", [("Close", 0.0), ("Low", -1.5), ("Open", 0.0), ("High", -3.0)])
def test_non_positive_price(column, value):
    frame = synthetic_prices()
    frame.loc[30, column] = value
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
    assert_one_line_error(info, "prices.csv", "non-positive price", frame.loc[30, "Date"])


def test_negative_volume():
    frame = synthetic_prices()
    frame.loc[12, "Volume"] = -100
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
    assert_one_line_error(info, "prices.csv", "negative volume")


def test_zero_volume_is_allowed():
    frame = synthetic_prices()
    frame.loc[12, "Volume"] = 0
    assert validate_prices(frame, "x", params("TEST"), "TEST")["Volume"].iloc[12] == 0


def test_duplicate_date():
    frame = synthetic_prices()
    frame.loc[40, "Date"] = frame.loc[39, "Date"]
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
    assert_one_line_error(info, "prices.csv", "duplicate date", frame.loc[39, "Date"])


def test_duplicate_outside_the_range_is_ignored():
    frame = synthetic_prices(rows=100)
    frame.loc[1, "Date"] = frame.loc[0, "Date"]
    kept = validate_prices(frame, "x", params("TEST", start=frame.loc[5, "Date"]), "TEST")
    assert len(kept) == 95


def test_too_few_rows():
    frame = synthetic_prices(rows=MIN_ROWS - 1)
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
    assert_one_line_error(info, f"only {MIN_ROWS - 1} rows", "'TEST'", f"at least {MIN_ROWS}")
    assert len(validate_prices(synthetic_prices(rows=MIN_ROWS), "x", params("TEST"), "TEST")) == MIN_ROWS


@pytest.mark.parametrize("bad", ["not a date", "2021-02-30", ""])
def test_unparseable_date(bad):
    frame = synthetic_prices()
    frame.loc[7, "Date"] = bad
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
    assert_one_line_error(info, "prices.csv", "unparseable date in row 7")


@pytest.mark.parametrize("column", ["Close", "Volume"])
def test_non_numeric_value(column):
    frame = synthetic_prices().astype({column: object})
    frame.loc[20, column] = "n/a"
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
    assert_one_line_error(info, "prices.csv", "missing, non-numeric or infinite", column)


def test_missing_price_value():
    frame = synthetic_prices()
    frame.loc[20, "High"] = np.nan
    with pytest.raises(DlpipeError) as info:
        validate_prices(frame, "prices.csv", params("TEST"), "TEST")
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
    raw = download_yfinance(p, "MSFT")
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

    frame = validate_prices(raw, "yfinance MSFT", p, "MSFT")

    expected = synthetic_prices(rows=80, seed=11, start="2024-03-01")
    assert list(frame.columns) == ["Date", *PRICE_COLUMNS]
    assert len(frame) == 80
    assert frame["Date"].iloc[0] == pd.Timestamp("2024-03-01")
    assert frame["Date"].is_monotonic_increasing
    for column in ("Open", "High", "Low", "Close"):
        np.testing.assert_allclose(frame[column].to_numpy(), expected[column].to_numpy())
    np.testing.assert_array_equal(frame["Volume"].to_numpy(), expected["Volume"].to_numpy())


def test_download_yfinance_asks_for_the_given_ticker(yf_calls):
    # One call per ticker: the one named, not the first of data.stocks.tickers.
    yf_calls["response"] = yfinance_frame("GOOG")
    p = StocksParams(source="yfinance", tickers=["MSFT", "GOOG"])
    frame = validate_prices(download_yfinance(p, "GOOG"), "yfinance GOOG", p, "GOOG")
    assert [call[0] for call in yf_calls["calls"]] == ["GOOG"]
    assert yf_calls["calls"][0][1]["start"] is None and yf_calls["calls"][0][1]["end"] is None
    assert len(frame) == 80


def test_download_yfinance_tz_aware_index(yf_calls):
    frame = yfinance_frame()
    frame.index = frame.index.tz_localize("America/New_York")
    yf_calls["response"] = frame
    p = params("MSFT", source="yfinance")
    clean = validate_prices(download_yfinance(p, "MSFT"), "yfinance", p, "MSFT")
    assert clean["Date"].dt.tz is None
    assert clean["Date"].iloc[0] == pd.Timestamp("2024-03-01")


def test_download_yfinance_flat_columns(yf_calls):
    # Older yfinance (and multi_level_index=False) return flat columns.
    frame = yfinance_frame()
    frame.columns = frame.columns.get_level_values(0)
    yf_calls["response"] = frame
    p = params("MSFT", source="yfinance")
    assert len(validate_prices(download_yfinance(p, "MSFT"), "yfinance", p, "MSFT")) == 80


def test_download_yfinance_empty(yf_calls):
    empty = yfinance_frame().iloc[:0]
    yf_calls["response"] = empty
    p = params("NOSUCHTICKER", source="yfinance", start="2024-01-01", end="2024-02-01")
    with pytest.raises(DlpipeError) as info:
        download_yfinance(p, "NOSUCHTICKER")
    assert yf_calls["calls"][0][0] == "NOSUCHTICKER"
    assert_one_line_error(info, "data.stocks.tickers", "'NOSUCHTICKER'", "no rows", "2024-01-01")


def test_download_yfinance_none(yf_calls):
    yf_calls["response"] = None
    with pytest.raises(DlpipeError, match="'ZZZ'"):
        download_yfinance(params("ZZZ", source="yfinance"), "ZZZ")


def test_download_yfinance_exception(yf_calls):
    yf_calls["response"] = ConnectionError("Failed to resolve 'query2.finance.yahoo.com'")
    with pytest.raises(DlpipeError) as info:
        download_yfinance(params("MSFT", source="yfinance"), "MSFT")
    assert_one_line_error(info, "'MSFT'", "failed", "ConnectionError", "query2.finance.yahoo.com")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_download_yfinance_bad_rows_caught_by_validation(yf_calls):
    frame = yfinance_frame()
    frame.iloc[10, frame.columns.get_loc(("Close", "MSFT"))] = np.nan  # a partially filled day
    yf_calls["response"] = frame
    p = params("MSFT", source="yfinance")
    with pytest.raises(DlpipeError, match="missing, non-numeric or infinite Close"):
        validate_prices(download_yfinance(p, "MSFT"), "yfinance MSFT", p, "MSFT")


# ---------------------------------------------------------------- features, windows, split


def test_make_features(goog):
    features = make_features(goog)
    assert features.shape == (2147, len(FEATURES))
    assert features.dtype == np.float32
    close, high, low, open_, volume = (goog[c].to_numpy() for c in ("Close", "High", "Low", "Open", "Volume"))
    day = 500  # feature row 499 describes day 500
    assert features[day - 1, 0] == pytest.approx(np.log(close[day] / close[day - 1]), abs=1e-6)
    assert features[day - 1, 1] == pytest.approx(np.log(high[day] / low[day]), abs=1e-6)
    assert features[day - 1, 2] == pytest.approx(np.log(close[day] / open_[day]), abs=1e-6)
    assert features[day - 1, 3] == pytest.approx(np.log1p(volume[day]) - np.log1p(volume[day - 1]), abs=1e-6)
    assert np.isfinite(features).all()


def expected_inputs(features: np.ndarray, target_days: np.ndarray, window: int) -> np.ndarray:
    """The feature rows of days d-window .. d-1 for each target day d (row j describes day j+1)."""
    rows = target_days[:, None] - window - 1 + np.arange(window)[None, :]
    return features[rows]


@pytest.mark.parametrize("window", [5, 30])
def test_make_windows_whole_table(goog, window):
    windows = make_windows(goog, window)
    n = len(goog) - 1 - window
    assert windows.x.shape == (n, window, len(FEATURES))
    assert windows.x.dtype == np.float32
    assert windows.y.shape == (n, 1)
    assert windows.y.dtype == np.float32
    assert windows.last_close.shape == windows.next_close.shape == windows.dates.shape == (n,)
    assert len(windows) == n
    np.testing.assert_array_equal(windows.target_days, np.arange(window + 1, len(goog)))
    np.testing.assert_array_equal(windows.ticker, np.zeros(n))

    close = goog["Close"].to_numpy()
    dates = goog["Date"].to_numpy()
    for i in (0, 1, n // 2, n - 1):
        # The target: next-day close log return, and the day it belongs to.
        assert windows.y[i, 0] == pytest.approx(np.log(windows.next_close[i] / windows.last_close[i]), abs=1e-6)
        day = np.flatnonzero(dates == windows.dates[i])[0]
        assert day == windows.target_days[i]
        assert windows.next_close[i] == close[day]
        assert windows.last_close[i] == close[day - 1]
        # The window ends on the day before the target day: no look-ahead.
        assert windows.x[i, -1, 0] == pytest.approx(np.log(windows.last_close[i] / close[day - 2]), abs=1e-6)
        assert windows.x[i, 0, 0] == pytest.approx(np.log(close[day - window] / close[day - window - 1]), abs=1e-6)
    np.testing.assert_array_equal(windows.x, expected_inputs(make_features(goog), windows.target_days, window))
    # Consecutive windows slide by one day.
    np.testing.assert_array_equal(windows.x[1, :-1], windows.x[0, 1:])
    np.testing.assert_array_equal(windows.last_close[1:], windows.next_close[:-1])
    assert windows.dates[-1] == dates[-1]
    assert windows.dates[0] == dates[window + 1]


def test_make_windows_inside_days(goog):
    window, first, end = 10, 300, 400
    windows = make_windows(goog, window, (first, end), ticker=3)
    # The first target day is the first whose earliest close (day d-window-1) is `first`; the last is end-1.
    np.testing.assert_array_equal(windows.target_days, np.arange(first + window + 1, end))
    np.testing.assert_array_equal(windows.ticker, np.full(len(windows), 3))
    assert windows.dates[0] == goog["Date"].iloc[first + window + 1]
    assert windows.dates[-1] == goog["Date"].iloc[end - 1]
    # The same windows as those of the whole table with these target days.
    whole = make_windows(goog, window)
    keep = np.isin(whole.target_days, windows.target_days)
    np.testing.assert_array_equal(windows.x, whole.x[keep])
    np.testing.assert_array_equal(windows.y, whole.y[keep])


def test_make_windows_too_long(goog):
    with pytest.raises(DlpipeError, match=r"train\.\*\.window"):
        make_windows(goog.iloc[:40], 30)
    assert len(make_windows(goog.iloc[:40], 29).y) == MIN_SPLIT_SAMPLES  # the smallest count accepted
    # Counted inside `days`, not over the table.
    with pytest.raises(DlpipeError) as info:
        make_windows(goog, 30, (1000, 1040))
    assert_one_line_error(info, "train.*.window", "window 30", "9 samples", "40 days", f"at least {MIN_SPLIT_SAMPLES}")
    assert len(make_windows(goog, 29, (1000, 1040))) == MIN_SPLIT_SAMPLES


@pytest.mark.parametrize("n_days", [60, 100, 1300, 2148, 2485])
def test_part_bounds(n_days):
    bounds = part_bounds(n_days)
    assert list(bounds) == ["train", "val", "test"]
    # Contiguous, in order, covering every day once.
    assert bounds["train"][0] == 0
    assert bounds["train"][1] == bounds["val"][0]
    assert bounds["val"][1] == bounds["test"][0]
    assert bounds["test"][1] == n_days
    assert bounds["train"][1] == int(n_days * 0.7)
    assert bounds["val"][1] - bounds["val"][0] == int(n_days * 0.15)


def test_part_bounds_of_100_days():
    assert part_bounds(100) == {"train": (0, 70), "val": (70, 85), "test": (85, 100)}


@pytest.mark.parametrize("window", [5, 20])
def test_split_windows(goog, window):
    splits = split_windows(goog, window, ticker=1, name="GOOG")
    assert list(splits) == ["train", "val", "test"]
    for split, (first, end) in part_bounds(len(goog)).items():
        w = splits[split]
        np.testing.assert_array_equal(w.target_days, np.arange(first + window + 1, end))
        assert len(w.x) == len(w.y) == len(w.last_close) == len(w.next_close) == len(w.dates) == len(w.ticker)
        assert (w.ticker == 1).all()
        np.testing.assert_array_equal(w.dates, goog["Date"].to_numpy()[w.target_days])
    assert splits["train"].dates.max() < splits["val"].dates.min()
    assert splits["val"].dates.max() < splits["test"].dates.min()


def test_split_too_short_names_split_and_ticker():
    prices = validate_prices(synthetic_prices(rows=100), "x", params("TEST"), "TEST")
    # 70 training days fit 59 windows of 10; the 15 validation days fit only 4.
    with pytest.raises(DlpipeError) as info:
        split_windows(prices, 10, 0, "TEST")
    assert_one_line_error(info, "train.*.window", "val split of TEST")
    assert len(split_windows(prices, 3, 0, "TEST")["val"]) == 15 - 3 - 1


def test_concatenate_and_ticker_inputs(goog, msft):
    parts = [split_windows(goog, 5, 0, "GOOG")["test"], split_windows(msft, 5, 1, "MSFT")["test"]]
    pooled = concatenate(parts)
    assert isinstance(pooled, Windows)
    assert len(pooled) == len(parts[0]) + len(parts[1])
    np.testing.assert_array_equal(pooled.x[: len(parts[0])], parts[0].x)
    np.testing.assert_array_equal(pooled.dates[len(parts[0]) :], parts[1].dates)
    np.testing.assert_array_equal(pooled.ticker, np.repeat([0, 1], [len(parts[0]), len(parts[1])]))

    inputs = ticker_inputs(pooled, 3)
    assert inputs.shape == (len(pooled), 5, len(FEATURES) + 3)
    assert inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs[:, :, : len(FEATURES)], pooled.x)
    one_hot = inputs[:, :, len(FEATURES) :]
    expected = np.zeros((len(pooled), 3), np.float32)
    expected[np.arange(len(pooled)), pooled.ticker] = 1.0
    np.testing.assert_array_equal(one_hot, np.broadcast_to(expected[:, None, :], one_hot.shape))


def test_load_stock_data(config):
    fetch_stocks(config)
    data = load_stock_data(config.paths.raw_stocks, 10)
    assert data.tickers == ["GOOG", "MSFT"]
    for index, ticker in enumerate(data.tickers):
        expected = split_windows(read_prices(config.paths.raw_stocks, ticker), 10, index, ticker)
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(data.splits[ticker][split].x, expected[split].x)
            assert (data.splits[ticker][split].ticker == index).all()
    pooled = data.pooled("val")
    assert len(pooled) == len(data.splits["GOOG"]["val"]) + len(data.splits["MSFT"]["val"])


# ---------------------------------------------------------------- no look-ahead
# A window's inputs never come from its target day or later; the splits are separated by more than a window,
# so no val/test input is a training target; the standardisation statistics come from the training part only;
# and a window never mixes two tickers' prices.


def scaled_from(prices: pd.DataFrame, day: int, factor: float = 3.0) -> pd.DataFrame:
    """The prices with every price and volume on and after row `day` multiplied by `factor`."""
    changed = prices.astype({"Volume": np.float64})
    columns = list(PRICE_COLUMNS)
    changed.loc[day:, columns] = changed.loc[day:, columns].to_numpy() * factor
    return changed


def reshuffled_from(prices: pd.DataFrame, day: int, seed: int = 0) -> pd.DataFrame:
    """The prices with every row from `day` on replaced by a different (valid) random walk."""
    changed = prices.copy()
    other = synthetic_prices(rows=len(prices) - day, seed=seed)
    for column in PRICE_COLUMNS:
        changed.loc[day:, column] = other[column].to_numpy() * (50.0 if column != "Volume" else 1)
    return changed


def jittered(prices: pd.DataFrame, rows: slice, seed: int = 0) -> pd.DataFrame:
    """The prices with each day of `rows` moved by its own random factor (the same for its O, H, L and C,
    so the day stays valid) and its volume by another: every feature of those days changes."""
    rng = np.random.default_rng(seed)
    changed = prices.astype({"Volume": np.float64})
    n = len(changed.loc[rows])
    factor = np.exp(rng.normal(0.0, 0.1, n))[:, None]
    changed.loc[rows, ["Open", "High", "Low", "Close"]] = changed.loc[rows, ["Open", "High", "Low", "Close"]] * factor
    changed.loc[rows, "Volume"] = changed.loc[rows, "Volume"] * rng.uniform(0.5, 2.0, n)
    return changed


def all_windows(prices: pd.DataFrame, window: int) -> list[Windows]:
    return [make_windows(prices, window), *split_windows(prices, window, 0, "GOOG").values()]


@pytest.mark.parametrize("window", [5, 20])
def test_window_input_days_precede_the_target_date(goog, window):
    dates = goog["Date"].to_numpy()
    features = make_features(goog)
    for windows in all_windows(goog, window):
        days = windows.target_days
        # The inputs are exactly the feature rows of days d-window .. d-1 (each a change from the day before,
        # so the earliest close read is on day d-window-1) ...
        np.testing.assert_array_equal(windows.x, expected_inputs(features, days, window))
        input_days = days[:, None] - window - 1 + np.arange(window + 1)[None, :]  # every close the inputs read
        # ... all dated strictly before the target date.
        assert (dates[input_days] < windows.dates[:, None]).all()
        assert (dates[input_days].max(axis=1) == dates[days - 1]).all()


@pytest.mark.parametrize("change", [scaled_from, reshuffled_from])
@pytest.mark.parametrize("window", [5, 20])
def test_changing_prices_from_a_day_on_leaves_earlier_windows_unchanged(goog, change, window):
    bounds = part_bounds(len(goog))
    train_end, val_end = bounds["train"][1], bounds["val"][1]
    for day in (300, train_end - 1, train_end, train_end + window + 1, val_end, val_end + window + 2, len(goog) - 1):
        changed = change(goog, day)
        for before, after in zip(all_windows(goog, window), all_windows(changed, window), strict=True):
            np.testing.assert_array_equal(before.target_days, after.target_days)
            known = before.target_days <= day
            # Every window whose target is on or before the changed day reads none of the changed prices.
            np.testing.assert_array_equal(after.x[known], before.x[known])
            np.testing.assert_array_equal(after.last_close[known], before.last_close[known])
            # The check can fail: windows that end on the changed day or later do see the change.
            sees = (before.target_days > day) & (before.target_days <= day + window)
            if sees.any():
                assert not np.array_equal(after.x[sees], before.x[sees])
            # The target of the changed day itself moves (under the x3 scaling: by log 3).
            if day in before.target_days:
                i = int(np.flatnonzero(before.target_days == day)[0])
                assert after.y[i, 0] != before.y[i, 0]


@pytest.mark.parametrize("window", [2, 5, 10, 20, 30])
@pytest.mark.parametrize("ticker", ["GOOG", "MSFT"])
def test_splits_are_separated_by_more_than_a_window(goog, msft, ticker, window):
    prices = {"GOOG": goog, "MSFT": msft}[ticker]
    splits = split_windows(prices, window, 0, ticker)
    train, val, test = (splits[s].target_days for s in ("train", "val", "test"))
    assert val.min() - train.max() > window
    assert test.min() - val.max() > window
    # No val/test window reads a training target day (nor a val target day, for test windows).
    for later, earlier_targets in ((val, train), (test, train), (test, val)):
        read = later[:, None] - window - 1 + np.arange(window + 1)[None, :]  # closes read by each window's inputs
        assert not np.isin(read, earlier_targets).any()
    # And the same shown by the prices: changing every day up to the last training target changes no val or test
    # window, and changing every day up to the last val target changes no test window.
    for last, unchanged in ((train.max(), ("val", "test")), (val.max(), ("test",))):
        after = split_windows(jittered(prices, slice(0, last)), window, 0, ticker)
        for split in unchanged:
            np.testing.assert_array_equal(after[split].x, splits[split].x)
            np.testing.assert_array_equal(after[split].y, splits[split].y)
        assert not np.array_equal(after["train"].y, splits["train"].y)


def rewrite_prices(config, ticker: str, change) -> None:
    """Apply `change` to the fetched CSV of `ticker` and record its new sha256 in meta.json, as a fresh
    fetch_stocks would, so read_prices accepts it."""
    raw = config.paths.raw_stocks
    path = raw / f"{ticker}.csv"
    frame = pd.read_csv(path)
    change(frame)
    frame.to_csv(path, index=False)
    meta = read_json(raw / "meta.json")
    meta["files"][ticker]["sha256"] = sha256_file(path)
    meta["sha256"] = hashlib.sha256("".join(f["sha256"] for f in meta["files"].values()).encode()).hexdigest()
    write_json(raw / "meta.json", meta)


def stats(config, window: int = 10) -> tuple[tuple, StockWindowDataModule]:
    datamodule = StockWindowDataModule(config.paths.raw_stocks, window, 64)
    return datamodule.feature_stats(), datamodule


def test_feature_and_target_statistics_come_from_training_days_only(config):
    fetch_stocks(config)
    (mean, std, target_mean, target_std), before = stats(config)
    assert mean.shape == std.shape == (len(FEATURES) + 2,)
    np.testing.assert_array_equal(mean[len(FEATURES) :], [0.0, 0.0])  # the ticker columns are left as they are
    np.testing.assert_array_equal(std[len(FEATURES) :], [1.0, 1.0])
    # The statistics are those of the pooled training windows of both tickers.
    train = before.setup().pooled("train")
    flat = train.x.reshape(-1, len(FEATURES))
    np.testing.assert_allclose(mean[: len(FEATURES)], flat.mean(0), rtol=1e-6)
    assert target_mean == pytest.approx(float(train.y.mean()))
    assert target_std == pytest.approx(float(train.y.std()))
    assert len(train) == len(before.setup().splits["GOOG"]["train"]) + len(before.setup().splits["MSFT"]["train"])

    train_end = part_bounds(len(before.setup().prices["GOOG"]))["train"][1]
    rng = np.random.default_rng(0)

    def change_val_and_test(frame: pd.DataFrame) -> None:
        later = frame.index >= train_end  # every val and test day of GOOG, the first one included
        factor = np.exp(rng.normal(0.0, 0.2, later.sum()))  # the same factor for a day's O, H, L and C
        for column in ("Open", "High", "Low", "Close"):
            frame.loc[later, column] = frame.loc[later, column] * factor
        frame.loc[later, "Volume"] = frame.loc[later, "Volume"] * 7

    rewrite_prices(config, "GOOG", change_val_and_test)
    (mean2, std2, target_mean2, target_std2), after = stats(config)
    # The edit took effect: the val and test windows are different ...
    for split in ("val", "test"):
        assert not np.array_equal(after.setup().splits["GOOG"][split].x, before.setup().splits["GOOG"][split].x)
    # ... and the statistics are exactly what they were.
    np.testing.assert_array_equal(mean2, mean)
    np.testing.assert_array_equal(std2, std)
    assert (target_mean2, target_std2) == (target_mean, target_std)

    def change_last_training_close(frame: pd.DataFrame) -> None:
        day = train_end - 1
        frame.loc[day, "Close"] = frame.loc[day, "Close"] * 1.02
        frame.loc[day, "High"] = max(frame.loc[day, "High"], frame.loc[day, "Close"])

    # The last training day is a training target but the input of no training window: the target statistics
    # move, the feature statistics do not.
    rewrite_prices(config, "GOOG", change_last_training_close)
    (mean3, std3, target_mean3, target_std3), _ = stats(config)
    assert target_mean3 != target_mean
    assert target_std3 != target_std
    np.testing.assert_array_equal(mean3, mean)

    def change_a_training_open(frame: pd.DataFrame) -> None:
        assert frame.loc[100, "Open"] != frame.loc[100, "Close"]
        frame.loc[100, "Open"] = frame.loc[100, "Close"]  # the candle body of day 100 becomes 0

    rewrite_prices(config, "GOOG", change_a_training_open)
    (mean4, std4, target_mean4, _), _ = stats(config)
    log_body = FEATURES.index("log_body")
    assert mean4[log_body] != mean3[log_body]
    assert std4[log_body] != std3[log_body]
    assert target_mean4 == target_mean3  # no close moved


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_windows_never_cross_tickers(config, split):
    fetch_stocks(config)
    window = 10
    data = load_stock_data(config.paths.raw_stocks, window)
    pooled = data.pooled(split)
    inputs = ticker_inputs(pooled, len(data.tickers))
    seen = set()
    for index, ticker in enumerate(data.tickers):
        own = pooled.ticker == index
        assert own.sum() == len(data.splits[ticker][split])
        prices = data.prices[ticker]
        days = pooled.target_days[own]
        # Every input comes from this ticker's own prices, at the days before the target ...
        np.testing.assert_array_equal(pooled.x[own], expected_inputs(make_features(prices), days, window))
        np.testing.assert_array_equal(pooled.dates[own], prices["Date"].to_numpy()[days])
        np.testing.assert_array_equal(pooled.next_close[own], prices["Close"].to_numpy()[days])
        np.testing.assert_array_equal(pooled.last_close[own], prices["Close"].to_numpy()[days - 1])
        # ... and the ticker columns name it on every day of the window.
        assert (inputs[own][:, :, len(FEATURES) + index] == 1.0).all()
        assert inputs[own][:, :, len(FEATURES) :].sum() == own.sum() * window
        seen.add(index)
    assert seen == {0, 1}
    assert len(pooled) == sum(len(data.splits[t][split]) for t in data.tickers)
    # Another ticker's prices change no window of this one.
    other = split_windows(scaled_from(data.prices["MSFT"], 0, 1.7), window, 1, "MSFT")
    repooled = concatenate([data.splits["GOOG"][split], other[split]])
    goog = pooled.ticker == 0
    np.testing.assert_array_equal(repooled.x[goog], pooled.x[goog])
