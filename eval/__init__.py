"""Evaluation: metrics (``eval.metrics``), one eval cell (``eval.runner.run_cell``), sweeps
(``python eval/main.py [-m]``), reports (``python -m eval.report SWEEP_DIR``) and single
generations (``python -m eval.generate``). See docs/eval.md."""
