"""Reading models without changing them: parameter counts, routing traces and their
statistics, calibration texts, evaluation, and serving plans."""
