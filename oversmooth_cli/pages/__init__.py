"""Self-contained HTML reports (``report.html``), one per run, built from the files on disk: a measure run
(:func:`.measure.measure_page`), a check (:func:`.gate.check_page`) and a finetune run with its ``--control`` and
``--seeds`` variants (:func:`.finetune.finetune_page`), written with :func:`.document.write_page`. Each page is one
file with its CSS, one small script and every figure (inline SVG, images as ``data:`` PNGs) inside; it loads
nothing from anywhere else. The figures are drawn by :mod:`.svg` (no matplotlib), the shell is :mod:`.document`."""
