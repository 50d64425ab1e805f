"""The memory and communication model of docs/scaling.md, as numbers.

    .venv/bin/python -m bench.scaling_model [--ranks 8 32 128 512] [--keep-ratio 0.1]

Parameter counts come from the Hugging Face configurations of T5-3B, T5-11B and BART-large,
instantiated on the meta device (no weights), split into entries eligible for the Fisher mask and
excluded ones (``fsam_dist.core.DEFAULT_EXCLUDE``: embeddings, layer norms, biases, relative
attention bias). Formulas (bytes per rank, W ranks, full sharding -- ZeRO-3 or FSDP FULL_SHARD /
FSDP2; every parameter split evenly):

* fp32: params 4N/W, grads 4N/W, AdamW m and v 8N/W.
  bf16 under ZeRO-3: + the bf16 partition 2N/W (fp32 master, fp32 gradient accumulation);
  bf16 under FSDP2 (MixedPrecisionPolicy): the shards stay fp32, bf16 copies are transient.
* FSAM state: the mask, min(n/8, 4c) bytes per view -- N_e/8 at κ = 0.1 -- plus, during pass 2,
  the restore data: ``--restore-bytes`` per masked entry, κ·N_e (2.08: the low 16 bits, +4 % for
  ~1 % exceptions at 8 B; the bf16 ZeRO-3 partition keeps its 2-byte values) and
  ``--excluded-restore-bytes`` per excluded entry, N_x (1.13: the low byte + a carry bit, as
  measured on the benchmark model's tied embedding; its gradient is dense through the LM head, so
  all of it is perturbed with ``excluded_mode: dense``).
* SAM's full copy (what a conventional SAM keeps to restore): 4N/W.
* Per pass the backend moves (ring): an all-gather of the weights in forward and again in
  backward (reshard after forward), and a reduce-scatter of the gradients: 3 N b bytes of
  collective buffers per rank (b = 2 in bf16), each rank sending (W-1)/W of it.
* FSAM's own collectives (measured in tests/test_scaling.py): per perturbed step 2 all-reduces,
  40 B; per refresh 4 more, 20,624 B (+4 of 32,768 B only if entries tie at the threshold).
"""

from __future__ import annotations

import argparse

GB = 1e9
MB = 1e6
TOPK_BYTES = (2050 + 16 + 256 + 256) * 8


def model_sizes() -> dict[str, tuple[int, int]]:
    """{name: (total entries, eligible entries)} from the configurations, on the meta device."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    from fsam_dist.core import DEFAULT_EXCLUDE, is_eligible

    configs = {
        "T5-3B": (T5ForConditionalGeneration, T5Config(vocab_size=32128, d_model=1024, d_kv=128, d_ff=16384,
                                                       num_layers=24, num_heads=32)),
        "T5-11B": (T5ForConditionalGeneration, T5Config(vocab_size=32128, d_model=1024, d_kv=128, d_ff=65536,
                                                        num_layers=24, num_heads=128)),
        "BART-large": (BartForConditionalGeneration, BartConfig(
            vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
            decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024)),
    }
    out = {}
    for name, (cls, cfg) in configs.items():
        with torch.device("meta"):
            model = cls(cfg)
        params = list(model.named_parameters())
        out[name] = (sum(p.numel() for _, p in params),
                     sum(p.numel() for n, p in params if is_eligible(n, DEFAULT_EXCLUDE)))
    return out


def fsam_state(total: int, eligible: int, keep: float, restore_bytes: float,
               excluded_restore_bytes: float) -> tuple[float, float]:
    """(mask bytes, restore bytes) over the whole model (divide by W for a rank)."""
    mask = min(eligible / 8, 4 * keep * eligible)
    restore = restore_bytes * keep * eligible + excluded_restore_bytes * (total - eligible)
    return mask, restore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 32, 128, 512])
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--restore-bytes", type=float, default=2.08)
    parser.add_argument("--excluded-restore-bytes", type=float, default=1.13)
    args = parser.parse_args()
    sizes = model_sizes()
    print("| model | N | eligible | excluded |")
    print("|---|---:|---:|---:|")
    for name, (n, e) in sizes.items():
        print(f"| {name} | {n / 1e9:.3f} B | {e / 1e9:.3f} B ({e / n:.1%}) | {(n - e) / 1e6:.1f} M |")

    print("\nMemory per rank (fp32 training; ZeRO-3 = FSDP; ZeRO-3 in bf16 adds 2N/W for the bf16 partition):\n")
    print("| model | W | params | grads | AdamW state | FSAM mask | FSAM restore (pass 2) | FSAM total "
          "| SAM full copy | FSAM / SAM copy | FSAM / (params+grads+AdamW) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (n, e) in sizes.items():
        mask, restore = fsam_state(n, e, args.keep_ratio, args.restore_bytes, args.excluded_restore_bytes)
        for w in args.ranks:
            base = 16 * n / w
            state = (mask + restore) / w
            print(f"| {name} | {w} | {4 * n / w / GB:.3f} GB | {4 * n / w / GB:.3f} GB | {8 * n / w / GB:.3f} GB | "
                  f"{mask / w / MB:.1f} MB | {restore / w / MB:.1f} MB | {state / MB:.1f} MB | "
                  f"{4 * n / w / MB:.1f} MB | {state / (4 * n / w):.3f} | {state / base:.2%} |")

    print("\nCommunication per optimizer step, per rank (collective buffer bytes; ring: (W-1)/W of an all-gather /"
          " reduce-scatter buffer is sent, 2(W-1)/W of an all-reduce's):\n")
    print("| model | backend per pass (bf16) | AdamW step | FSAM step (k=1) | FSAM k=4 (mean) | FSAM's own per step "
          "| FSAM's own per refresh |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (n, _) in sizes.items():
        per_pass = 3 * n * 2
        print(f"| {name} | {per_pass / GB:.1f} GB | {per_pass / GB:.1f} GB | {2 * per_pass / GB:.1f} GB | "
              f"{1.25 * per_pass / GB:.1f} GB | 2 all-reduces, 40 B | 4 all-reduces, {TOPK_BYTES:,} B "
              f"(+4, {4 * 4096 * 8:,} B, on ties) |")


if __name__ == "__main__":
    main()
