"""Fine-tune a seq2seq model (T5, BART, ...) with Hugging Face's Seq2SeqTrainer and shard-aware FSAM,
in the style of transformers' examples/pytorch/summarization/run_summarization.py: a local model
directory, JSONL or CSV files, and every Seq2SeqTrainingArguments flag, plus FSAM's (--rho,
--keep_ratio, --mask_interval, ... the CLI's fsam.* names). The change from a plain Trainer script
is one import and one class name: FSAMSeq2SeqTrainer(..., fsam_args=fsam_args).

    ARGS="--model_name_or_path MODEL_DIR --train_file train.jsonl --validation_file dev.jsonl \
          --output_dir runs/t5-fsam --per_device_train_batch_size 8 --gradient_accumulation_steps 2 \
          --learning_rate 3e-4 --max_steps 1000 --save_steps 200 --logging_steps 10 --do_train --do_eval \
          --rho 0.05 --keep_ratio 0.1 --mask_interval 100"

    python examples/run_seq2seq_fsam.py $ARGS                                  # one process
    torchrun --nproc_per_node 2 examples/run_seq2seq_fsam.py $ARGS             # DDP (CPU: gloo, add --use_cpu)
    deepspeed --num_gpus 2 examples/run_seq2seq_fsam.py $ARGS --deepspeed configs/deepspeed/zero3.json
                                                                               # ZeRO-1/2/3 (CPU works too)
    accelerate launch --config_file configs/accelerate/fsdp2.yaml examples/run_seq2seq_fsam.py $ARGS
                                                                               # FSDP2 (CPU: add --use_cpu)
    sbatch --nodes 2 --wrap "srun torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint \$(scontrol show hostnames \$SLURM_JOB_NODELIST | head -1):29500 \
        examples/run_seq2seq_fsam.py $ARGS"                                     # SLURM, 2 nodes x 8 GPUs

Resume with --resume_from_checkpoint runs/t5-fsam/checkpoint-200 (same number of processes: the
FSAM mask is saved per rank, fsam_state_rank*-of-*.pt in the checkpoint). What the Trainer
integration supports and refuses: fsam_dist/integrations/transformers.py (module docstring).

Data: one JSON object per line (or a CSV with a header row) with the fields named by
--text_column / --summary_column (default "source" / "target"). --pad_to_max_length pads every
batch to the maxima, so every split of a batch over processes or micro-batches has one shape.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import DataCollatorForSeq2Seq, HfArgumentParser, Seq2SeqTrainingArguments, set_seed

from fsam_dist.integrations.transformers import FSAMArguments, FSAMSeq2SeqTrainer
from fsam_dist.seq2seq.data import load_examples, tokenize_examples
from fsam_dist.seq2seq.model import load_model_and_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local directory with the model and its tokenizer "
                                                      "(save_pretrained output)."})


@dataclass
class DataTrainingArguments:
    train_file: str | None = field(default=None, metadata={"help": "Training data, .jsonl or .csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, .jsonl or .csv."})
    text_column: str = field(default="source", metadata={"help": "Field holding the input text."})
    summary_column: str = field(default="target", metadata={"help": "Field holding the target text."})
    source_prefix: str = field(default="", metadata={"help": "Prepended to every input (T5 task prefixes)."})
    max_source_length: int = field(default=128, metadata={"help": "Inputs are cut to this many tokens."})
    max_target_length: int = field(default=128, metadata={"help": "Targets are cut to this many tokens."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad every batch to the maxima."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation examples."})


class Features(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


def load_split(path: str, split: str, data: DataTrainingArguments, tokenizer, limit: int | None) -> Features:
    examples, _ = load_examples(path, split, source_field=data.text_column, target_field=data.summary_column,
                                prefix=data.source_prefix, max_examples=limit)
    return Features(tokenize_examples(examples, tokenizer, data.max_source_length, data.max_target_length))


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments, FSAMArguments))
    model_args, data_args, training_args, fsam_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.do_train and not data_args.train_file:
        parser.error("--do_train needs --train_file")
    if training_args.do_eval and not data_args.validation_file:
        parser.error("--do_eval needs --validation_file")
    set_seed(training_args.seed)

    model, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path)
    train = load_split(data_args.train_file, "train", data_args, tokenizer, data_args.max_train_samples) \
        if training_args.do_train else None
    evaluation = load_split(data_args.validation_file, "validation", data_args, tokenizer,
                            data_args.max_eval_samples) if training_args.do_eval else None
    collator = DataCollatorForSeq2Seq(
        tokenizer, model=model, label_pad_token_id=-100,
        padding="max_length" if data_args.pad_to_max_length else "longest",
        max_length=max(data_args.max_source_length, data_args.max_target_length) if data_args.pad_to_max_length
        else None)

    trainer = FSAMSeq2SeqTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                                 processing_class=tokenizer, data_collator=collator, fsam_args=fsam_args)
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        if trainer.is_fsdp_enabled:   # checkpoints stay sharded; the final model is written whole
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
