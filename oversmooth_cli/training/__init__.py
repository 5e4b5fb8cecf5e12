"""Training: the finetune options (:mod:`.config`), the patch-diversification losses (:mod:`.losses`, with
:mod:`.token_plan` and patch CutMix in :mod:`.cutmix`), the trainer, ``finetune()`` and its ``--control`` twin."""
