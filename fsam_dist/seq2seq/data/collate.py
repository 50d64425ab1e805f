"""Examples to model batches: tokenisation with truncation counts, and padding into tensors."""

from __future__ import annotations

import logging

import torch

from .report import DataReport

logger = logging.getLogger("fsam_dist.seq2seq.data")


def tokenize_examples(examples: list[dict], tokenizer, max_source_length: int, max_target_length: int,
                      report: DataReport | None = None) -> list[dict]:
    """Token ids of each example: ``{"input_ids": [...], "labels": [...]}`` (both end with the
    tokenizer's end-of-sequence token). Sequences longer than the maxima are cut (the EOS kept);
    the numbers cut are logged and, when ``report`` is given, stored in it."""
    if max_source_length < 2 or max_target_length < 2:
        raise ValueError("max_source_length and max_target_length must be at least 2")
    sources = [ex["source"] for ex in examples]
    targets = [ex["target"] for ex in examples]
    src = tokenizer(sources, truncation=False, add_special_tokens=True)["input_ids"] if sources else []
    tgt = tokenizer(text_target=targets, truncation=False, add_special_tokens=True)["input_ids"] if targets else []
    features, cut_src, cut_tgt = [], 0, 0
    eos = tokenizer.eos_token_id
    for s, t in zip(src, tgt):
        if len(s) > max_source_length:
            s, cut_src = _truncate(s, max_source_length, eos), cut_src + 1
        if len(t) > max_target_length:
            t, cut_tgt = _truncate(t, max_target_length, eos), cut_tgt + 1
        features.append({"input_ids": list(s), "labels": list(t)})
    if cut_src or cut_tgt:
        logger.info("truncated %d of %d sources to %d tokens and %d targets to %d tokens", cut_src, len(features),
                    max_source_length, cut_tgt, max_target_length)
    if report is not None:
        report.truncated_source += cut_src
        report.truncated_target += cut_tgt
    return features


def _truncate(ids: list[int], n: int, eos: int | None) -> list[int]:
    """The first ``n`` ids; where the sequence ends with EOS, the first ``n - 1`` and the EOS."""
    if eos is not None and ids and ids[-1] == eos:
        return list(ids[:n - 1]) + [eos]
    return list(ids[:n])


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of ``tokenize_examples`` features into a batch: ``input_ids`` padded with
    ``pad_token_id``, ``attention_mask`` 1/0, ``labels`` padded with -100 (ignored by the loss; the
    models build their decoder inputs from the labels)."""
    if not features:
        raise ValueError("collate got no features")
    n = len(features)
    src_len = max(len(f["input_ids"]) for f in features)
    tgt_len = max(len(f["labels"]) for f in features)
    input_ids = torch.full((n, src_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, src_len), dtype=torch.long)
    labels = torch.full((n, tgt_len), -100, dtype=torch.long)
    for i, f in enumerate(features):
        s, t = f["input_ids"], f["labels"]
        input_ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
        labels[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
