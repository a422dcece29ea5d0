import math

import pandas as pd

from pad_ray.report import printable


def _table(architectures: list[str]) -> pd.DataFrame:
    """Two finished trials and one ASHA stopped (no final evaluation: NaN), as `results_table` and the MLflow
    lookup lay them out; the main final columns are the first architecture's."""
    finals = {"convnet": ([0.71, 0.68, math.nan], [0.05, 0.06, math.nan]),
              "mlp": ([0.52, 0.55, math.nan], [0.02, 0.01, math.nan])}
    first = finals[architectures[0]]
    columns = {"trial_id": ["a", "b", "c"], "ipc": [1, 1, 1], "best_val_accuracy": [0.72, 0.70, 0.6],
               "final_test_accuracy": first[0], "final_test_std": first[1]}
    for name in architectures:
        columns[f"final_test_accuracy/{name}"], columns[f"final_test_std/{name}"] = finals[name]
    columns.update(iterations=[20, 20, 8], status=["done", "done", "stopped"],
                   mlflow_run_id=["r1", "r2", "r3"], distilled_set_uri=["runs:/r1/x", "runs:/r2/x", "runs:/r3/x"])
    return pd.DataFrame(columns)


def test_the_printed_table_drops_the_mlflow_columns_and_the_architecture_columns_it_repeats():
    shown = printable(_table(["convnet"]))
    assert list(shown.columns) == ["trial_id", "ipc", "best_val_accuracy", "final_test_accuracy", "final_test_std",
                                   "iterations", "status"]
    assert shown["final_test_accuracy"].tolist()[:2] == [0.71, 0.68]


def test_a_second_architecture_keeps_its_columns_and_the_first_is_shown_once():
    table = _table(["convnet", "mlp"])
    shown = printable(table)
    assert "final_test_accuracy/convnet" not in shown and "final_test_std/convnet" not in shown
    assert shown["final_test_accuracy/mlp"].tolist()[:2] == [0.52, 0.55]
    assert shown["final_test_std/mlp"].tolist()[:2] == [0.02, 0.01]
    assert len(table.columns) - len(shown.columns) == 4  # the two MLflow columns and convnet's two
