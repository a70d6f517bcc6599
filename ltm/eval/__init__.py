"""Evaluation: `ltm eval` (`evaluate`), the detection metrics (`metrics`), whether the mask lands on the known
manipulated regions (`mask_diagnostics`), and the report files and pages (`report`)."""
