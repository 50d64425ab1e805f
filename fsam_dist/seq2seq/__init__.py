"""The seq2seq application layer (plain functions; nothing here imports transformers at import time).

* :mod:`.model` — ``load_model_and_tokenizer(dir)``, ``model_kind(model)``.
* :mod:`.init_model` — a small random T5/BART plus a tokenizer trained offline
  (``python -m fsam_dist.seq2seq.init_model``).
* :mod:`.data` — ``load_examples`` (JSONL/CSV files, ``builtin:cmudict``, ``builtin:uagec``,
  ``builtin:django-<lang>``), ``tokenize_examples``, ``collate``.
* :mod:`.metrics` — ``compute_metrics`` (exact match, BLEU, chrF, ROUGE, PER/WER).
* :mod:`.generate` — ``generate_predictions``, ``distributed_generate``.
"""
