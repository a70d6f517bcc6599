"""An evaluation's report: report.json/.md, scores, ROC and pictures (`files`), the self-contained page and the
comparison of two runs (`html`), the cross-dataset table (`crossdata`) and the one table renderer (`tables`)."""
