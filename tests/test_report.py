"""The report page shows the course's recipes (transfer learning, distillation, convolution cost) from the
files their stages write."""

from __future__ import annotations

from dlpipe.report import render_recipes

TRANSFER = {
    "smallest_k": {"answer": "yes, fine tuning (k=5: scratch 0.364, fine tuning 0.754)"},
    "rows": [
        {"k": 5, "mode": "scratch", "test_accuracy": 0.364},
        {"k": 5, "mode": "fine_tuning", "test_accuracy": 0.754},
        {"k": 20, "mode": "scratch", "test_accuracy": 0.794},
        {"k": 20, "mode": "fine_tuning", "test_accuracy": 0.852},
    ],
}
DISTILL = {
    "distillation_helped": False,
    "accuracy_gain": -0.007,
    "mcnemar_pvalue": 0.167,
    "rows": [
        {"role": "teacher", "model": "resnet", "test_accuracy": 0.978, "trainable_params": 77754, "multiply_adds": 9},
        {"role": "student alone", "model": "cnn", "test_accuracy": 0.966, "trainable_params": 26722},
    ],
}
COST = {
    "rows": [
        {
            "in_channels": 32,
            "out_channels": 64,
            "size": 28,
            "params_ratio": 0.12674,
            "multiply_adds_ratio": 0.12674,
            "textbook_ratio": 0.12674,
            "time_ratio": 0.679,
        }
    ]
}


def test_recipes_show_their_tables_verdicts_and_figures(tmp_path):
    (tmp_path / "transfer").mkdir()
    (tmp_path / "transfer" / "accuracy_vs_k.png").write_bytes(b"png")
    page = render_recipes({"transfer": TRANSFER, "distill": DISTILL, "cost": COST}, tmp_path)
    assert "yes, fine tuning (k=5" in page and "<td>20</td><td>0.794</td><td>0.852</td>" in page
    assert 'src="transfer/accuracy_vs_k.png"' in page
    assert "Distillation did not help: -0.007" in page and "p = 0.167" in page
    assert "<td>77,754</td><td>9</td>" in page and "<td>26,722</td><td>-</td>" in page  # no count: a dash
    assert "<td>32 -&gt; 64</td><td>28 x 28</td><td>0.1267</td>" in page and "<td>0.679</td>" in page
    assert "depthwise.png" not in page  # a figure that is not there is not linked
    assert "Not run" not in page


def test_a_recipe_that_has_not_run_says_so(tmp_path):
    page = render_recipes({"transfer": None, "cost": COST}, tmp_path)
    assert "Not run (<code>dlpipe transfer</code>)" in page and "Not run (<code>dlpipe distill</code>)" in page
    assert "Not run (<code>dlpipe cost</code>)" not in page
