"""In-loop evaluation: a held-out loss set and accuracy tasks, evaluated before training, every --eval_every steps
and after the last step, on every process (DeepSpeed ZeRO-3 included).

    eval_loss            sum of token losses over the trained tokens of the loss set / number of those tokens
    eval_bits_per_byte   the same token-loss sum in bits (nats / ln 2) / UTF-8 bytes of those tokens' text
    eval/<task>_accuracy greedy generation scored as open_instruct/generation_tasks.py says (synthetic tasks:
                         exact match; tool_calc: tool_calc_call and tool_calc_answer) or highest-log-likelihood
                         option (mc:<file.jsonl>)
    eval/<task>_majority_baseline  the accuracy of always giving the task's most common expected answer (mc: always
                         choosing the most common correct choice) on the same examples: what a constant reply scores
    eval/centered_accuracy  mean over tasks of (accuracy - floor) / (1 - floor), floor = the larger of chance and
                         the majority baseline (ChatCORE-style, so a constant answer centers at 0 or below)

The loss set is --eval_dataset_mixer_list (tokenized and masked like training data) or --eval_fraction of the
training mixture, held out by a seeded hash of each example's tokens (`split_held_out`). Every process takes every
world-th example, sums its losses, tokens and bytes, and one all-reduce adds them up. Under ZeRO-3 each forward pass
gathers the weights collectively, so every process runs the same number of forward passes and generate calls (the
largest share's; the others run dummy batches whose results are dropped) and generation runs with synced_gpus.
The finetune loop calls `prepare_evaluation` once, `Evaluator.run` when `Evaluator.due`, and `eval_summary` at
the end; the records go through its MetricsLogger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from open_instruct.batching import collate
from open_instruct.chat_templates import end_of_turn_token_ids
from open_instruct.data import DataError, MixerItem, TokenizedMixture, jsonl_values, parse_mixer
from open_instruct.data_cache import get_mixture
from open_instruct.loss import token_loss_sum
from open_instruct.model_utils import ChunkedLossModel, pad_token_id
from open_instruct.generation_tasks import GenerationTask, generation_tasks
from open_instruct.tokenization import IGNORE_INDEX, encode_messages

logger = logging.getLogger(__name__)
MC_PREFIX = "mc:"
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------------------------------------------
# Metric definitions (pure functions; docs/finetune.md quotes them)
# ----------------------------------------------------------------------------------------------------------------
def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
    """Token losses in bits per UTF-8 byte of the text they predict: comparable across tokenizers."""
    return loss_sum_nats / math.log(2) / max(num_bytes, 1)


def centered_accuracy(results: list[tuple[float, float]]) -> float:
    """Mean over tasks of (accuracy - floor) / (1 - floor), from (accuracy, floor) pairs: 0 is what guessing or a
    constant answer scores, 1 is perfect, whatever each task's number of options. A task whose floor is 1 (every
    expected answer the same) can show no learning: it counts 0."""
    return sum((accuracy - floor) / (1 - floor) if floor < 1 else 0.0 for accuracy, floor in results) / len(results)


def majority_baseline(answers: list) -> float:
    """The accuracy of always giving the most common of `answers` (strings compared stripped, as exact match does;
    for multiple choice the correct choices' indices): its count / the number of answers; 0 for none."""
    if not answers:
        return 0.0
    counts: dict = {}
    for answer in answers:
        key = answer.strip() if isinstance(answer, str) else answer
        counts[key] = counts.get(key, 0) + 1
    return max(counts.values()) / len(answers)


def task_majority_baseline(task) -> float:
    """majority_baseline of a generation task's expected answers or a choice task's correct choices."""
    return majority_baseline(list(task.answers) if isinstance(task, GenerationTask)
                             else [question.answer for question in task.questions])


def trained_bytes(tokenizer, input_ids, labels) -> int:
    """UTF-8 bytes of the text of an example's trained tokens: the tokens at positions 1.. whose label is kept (what
    the loss predicts; the first token never is), decoded run by run, so a character split over several byte-level
    tokens counts once. Special tokens (the end-of-turn marker) decode to nothing and count 0 bytes."""
    ids = np.asarray(input_ids)[1:]
    trained = np.asarray(labels)[1:] != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[False], trained, [False]]).astype(np.int8)))
    return sum(len(tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False).encode("utf-8"))
               for start, end in zip(edges[0::2], edges[1::2]))


def reply_text(tokenizer, new_tokens: list[int], stop_ids: list[int]) -> str:
    """The generated reply up to (not including) the first end-of-turn token, stripped of surrounding whitespace.
    Special tokens inside the reply are kept, so a reply that wanders into another turn does not match."""
    cut = next((i for i, token in enumerate(new_tokens) if token in stop_ids), len(new_tokens))
    return tokenizer.decode(new_tokens[:cut], skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()


def best_option(logliks: list[float]) -> int:
    """The option with the highest log-likelihood (the first of equals)."""
    return int(np.argmax(logliks))


# ----------------------------------------------------------------------------------------------------------------
# The eval sets
# ----------------------------------------------------------------------------------------------------------------
def eval_mixer_items(args) -> list[MixerItem]:
    """The eval loss set's sources. Default split 'test' (synthetic tasks' held-out split, hub test splits), except
    local files, whose rows are their one split (which the data module calls 'train')."""
    try:
        items = parse_mixer(args.eval_dataset_mixer_list, args.eval_dataset_mixer_list_splits or ["test"])
    except DataError as exc:
        raise DataError(f"--eval_dataset_mixer_list: {exc}") from None
    if not args.eval_dataset_mixer_list_splits:
        for item in items:
            item.split = "train" if item.kind == "local" else item.split
    return items


def check_eval_spec(args) -> None:
    """Fail fast, before any data or model loads, on the eval sources and the multiple-choice files."""
    if args.eval_dataset_mixer_list:
        eval_mixer_items(args)
    for task in args.eval_tasks:
        if task.startswith(MC_PREFIX) and not Path(task[len(MC_PREFIX):]).is_file():
            raise DataError(f"--eval_tasks {task}: no such file (relative paths start from {Path.cwd()}).")


def example_hashes(mixture: TokenizedMixture, seed: int, chunk: int = 10_000) -> np.ndarray:
    """A seeded 64-bit hash of each example's tokens (as int64, whatever the storage dtype)."""
    key = f"eval_fraction:{seed}".encode()
    hashes = np.empty(len(mixture), dtype=np.uint64)
    for start in range(0, len(mixture), chunk):
        ids, _ = mixture.examples(range(start, min(start + chunk, len(mixture))))
        for offset, tokens in enumerate(ids):
            digest = hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=8, key=key).digest()
            hashes[start + offset] = int.from_bytes(digest, "big")
    return hashes


def split_held_out(mixture: TokenizedMixture, fraction: float, seed: int) -> tuple[TokenizedMixture, TokenizedMixture]:
    """(training part, held-out part). The held-out part is the round(fraction x distinct) distinct examples (by
    tokens) with the lowest seeded hashes, with every copy of them: a pure function of the tokenized mixture and the
    seed (so a resumed run trains on the same examples), disjoint from training by content, not just by row. The
    training part keeps the mixture's order, so its batches are planned exactly as for any mixture."""
    hashes = example_hashes(mixture, seed)
    distinct = np.unique(hashes)  # sorted
    keep = max(1, round(fraction * len(distinct)))
    if keep >= len(distinct):
        raise DataError(f"--eval_fraction {fraction} of {len(distinct)} distinct examples leaves none to train on.")
    held = hashes <= distinct[keep - 1]
    return mixture.subset(np.flatnonzero(~held)), mixture.subset(np.flatnonzero(held))


def eval_mixture(args, tokenizer, accelerator) -> TokenizedMixture:
    """--eval_dataset_mixer_list tokenized like training data, through the same cache (rank 0 fills it first)."""
    log = logger.info if accelerator.is_main_process else (lambda _: None)
    with accelerator.main_process_first(), accelerator.local_main_process_first():  # those first verify the cache
        mixture, _ = get_mixture(eval_mixer_args(args), tokenizer, log=log, verify=accelerator.is_local_main_process)
    return mixture


def eval_mixer_args(args):
    """The run's arguments with the eval loss set as the mixture: what get_mixture (and its cache) takes."""
    items = eval_mixer_items(args)
    return dataclasses.replace(args, dataset_mixer_list=list(args.eval_dataset_mixer_list),
                               dataset_mixer_list_splits=[item.split for item in items], dataset_mixer_file=None)


def sample_rows(num_rows: int, limit: int | None, seed: int) -> np.ndarray:
    """All rows, or a seeded sample of `limit` of them in their original order (sources stay interleaved)."""
    if limit is None or limit >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng([seed, 7]).choice(num_rows, size=limit, replace=False))


@dataclass
class ChoiceQuestion:
    question: str
    choices: list[str]
    answer: int  # 0-based


def answer_index(answer, num_choices: int, where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS:
        index = LETTERS.index(answer.upper())
    else:
        raise DataError(f"{where}: answer {answer!r} must be a 0-based index or a letter (A, B, ...).")
    if not 0 <= index < num_choices:
        raise DataError(f"{where}: answer {answer!r} is out of range for {num_choices} choices.")
    return index


def parse_question(row, where: str) -> ChoiceQuestion:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object with question, choices and answer.")
    for name in ("question", "choices", "answer"):
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} (a multiple-choice row has question, choices, answer).")
    choices = row["choices"]
    if not isinstance(row["question"], str):
        raise DataError(f"{where}: question must be a string.")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise DataError(f"{where}: choices must be a list of at least two strings.")
    return ChoiceQuestion(row["question"], choices, answer_index(row["answer"], len(choices), where))


def load_mc_file(path: str | Path) -> list[ChoiceQuestion]:
    """A multiple-choice JSONL file (ARC/MMLU shape); errors name the file and line."""
    questions = [parse_question(row, where) for where, _, row in jsonl_values(Path(path))]
    if not questions:
        raise DataError(f"{path}: no multiple-choice rows.")
    return questions


def mc_messages(question: ChoiceQuestion, option: int) -> list[dict]:
    """The question with its lettered choices as the user turn, one option's text as the assistant reply."""
    listed = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices))
    return [{"role": "user", "content": f"{question.question}\n\n{listed}"},
            {"role": "assistant", "content": question.choices[option]}]


@dataclass
class ChoiceTask:
    """Multiple choice, scored by the log-likelihood of each option as the assistant reply (the sum over its
    trained tokens: content and end-of-turn marker, not length-normalized). Chance is the mean of 1/choices."""

    name: str
    questions: list[ChoiceQuestion]
    options: list[list[tuple[np.ndarray, np.ndarray]]]  # per question, per option: (input_ids, labels)

    @property
    def chance(self) -> float:
        return float(np.mean([1 / len(q.choices) for q in self.questions]))

    def __len__(self) -> int:
        return len(self.questions)


def choice_task(spec: str, tokenizer, limit: int | None, add_bos: bool) -> ChoiceTask:
    """The first `limit` questions of an mc:<file.jsonl>, each option encoded with training's exact masks."""
    path = Path(spec[len(MC_PREFIX):])
    questions = load_mc_file(path)[:limit]
    options = []
    for question in questions:
        encoded = [encode_messages(tokenizer, mc_messages(question, i), None, "assistant", "whole_turns", add_bos)
                   for i in range(len(question.choices))]
        options.append([(np.asarray(e.input_ids), np.asarray(e.labels)) for e in encoded])
    return ChoiceTask(path.stem, questions, options)


# ----------------------------------------------------------------------------------------------------------------
# Sharding: every process runs the same number of forward passes
# ----------------------------------------------------------------------------------------------------------------
def all_rank_batches(sizes: list[int], world: int, batch_size: int) -> list[list[list[tuple[int, int]]]]:
    """[rank][batch] -> (item, unit) pairs: rank r takes items r, r + world, ... and cuts their units into batches
    of `batch_size`, where item i holds sizes[i] units (1 per example; one per option of a multiple-choice
    question). Every rank computes everyone's batches locally, without communication."""
    def batches_of(share: range) -> list[list[tuple[int, int]]]:
        units = [(item, unit) for item in share for unit in range(sizes[item])]
        return [units[i : i + batch_size] for i in range(0, len(units), batch_size)]

    return [batches_of(range(r, len(sizes), world)) for r in range(world)]


def rank_batches(sizes: list[int], rank: int, world: int, batch_size: int) -> tuple[list[list[tuple[int, int]]], int]:
    """This rank's batches and the number of batches every rank runs: the largest share's, so that under ZeRO-3
    the forward passes pair up (ranks with fewer run dummy ones)."""
    everyone = all_rank_batches(sizes, world, batch_size)
    return everyone[rank], max(len(b) for b in everyone)


def example_loss_sums(logits: torch.Tensor, batch: dict, count: int) -> torch.Tensor:
    """[count] sums of token losses per example of a collated batch: per row when padded, per packed example
    (position_ids restart at 0) when padding-free."""
    targets = batch["target_ids"].to(logits.device)
    token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="none")
    if "position_ids" not in batch:
        return token.view(targets.shape).sum(1)
    example = ((batch["position_ids"][0] == 0).cumsum(0) - 1).to(logits.device)
    return torch.zeros(count, device=logits.device).index_add_(0, example, token)


# ----------------------------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------------------------
class Evaluator:
    """Built once; `run(model, step)` evaluates every set on every process and returns one metrics record."""

    def __init__(self, args, tokenizer, accelerator, loss_set: TokenizedMixture | None, tasks: list):
        self.args, self.tokenizer, self.accelerator, self.tasks = args, tokenizer, accelerator, tasks
        self.batch_size = args.eval_batch_size or args.per_device_train_batch_size
        self.every, self.pad_id = args.eval_every, pad_token_id(tokenizer)
        self.stop_ids = end_of_turn_token_ids(tokenizer)
        rank, world = accelerator.process_index, accelerator.num_processes
        self.loss_set = loss_set
        self.baselines = {task.name: task_majority_baseline(task) for task in tasks}  # fixed answers
        if loss_set is not None:
            everyone = all_rank_batches([1] * len(loss_set), world, self.batch_size)
            self.loss_batches, self.loss_forwards = everyone[rank], max(len(b) for b in everyone)
            self.loss_chunks = self._chunks_per_forward(loss_set, everyone)
            # Bytes are fixed per example: counted once, by each rank for its own share.
            rows = [row for batch in self.loss_batches for row, _ in batch]
            ids, labels = loss_set.examples(rows) if rows else ([], [])
            self.loss_bytes = sum(trained_bytes(tokenizer, x, y) for x, y in zip(ids, labels))

    @classmethod
    def build(cls, args, tokenizer, accelerator, loss_set: TokenizedMixture | None) -> Evaluator:
        limit, seed = args.eval_max_examples, args.seed
        if loss_set is not None:
            loss_set = loss_set.subset(sample_rows(len(loss_set), limit, seed))
        tasks = []
        for spec in args.eval_tasks:
            tasks += ([choice_task(spec, tokenizer, limit, args.add_bos)] if spec.startswith(MC_PREFIX)
                      else generation_tasks(spec, tokenizer, limit, args.add_bos))
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise DataError(f"--eval_tasks: two tasks share a name ({', '.join(names)}); an mc file is named by its "
                            "stem, which must differ from the other tasks'.")
        evaluator = cls(args, tokenizer, accelerator, loss_set, tasks)
        logger.info("Evaluation: %s; tasks: %s; before training,%s after the last step.",
                    f"loss set of {len(loss_set)} examples" if loss_set is not None else "no loss set",
                    ", ".join(f"{t.name} ({len(t)})" for t in tasks) or "none",
                    f" every {args.eval_every} steps and" if args.eval_every else "")
        return evaluator

    def _chunks_per_forward(self, loss_set: TokenizedMixture, everyone: list) -> list[int | None]:
        """With the chunked loss, output-layer calls per forward, equal on every rank (each is a ZeRO-3 gather):
        sized by the rank with the most trained tokens in that forward, known locally from everyone's batches."""
        if not self.args.use_liger_kernel or len(everyone) == 1:
            return [None] * self.loss_forwards
        trained = np.zeros(self.loss_forwards, dtype=np.int64)
        for batches in everyone:
            for i, batch in enumerate(batches):
                trained[i] = max(trained[i], int(loss_set.trained_lengths[[row for row, _ in batch]].sum()))
        return [max(1, math.ceil(count / self.args.loss_chunk_size)) for count in trained]

    def due(self, steps_done: int, total_steps: int) -> bool:
        return steps_done == total_steps or (self.every is not None and steps_done % self.every == 0)

    # --- one evaluation ----------------------------------------------------------------------------------------
    def run(self, model, step: int, counters=None) -> dict:
        """Evaluate on every process; every process returns the same record. `counters` (metrics.RunCounters):
        the time spent here is taken out of the training throughput."""
        start, was_training = time.perf_counter(), model.training
        model.eval()
        local = []  # sums to add over processes: [loss, tokens, bytes] then [correct, total] per task
        with torch.no_grad():
            if self.loss_set is not None:
                local += [*self._loss_sums(model), self.loss_bytes]
            for task in self.tasks:
                local += self._task_counts(model, task)
        model.train(was_training)
        totals = self.accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=self.accelerator.device),
                                         reduction="sum").tolist()
        record = {"step": step, **self._metrics(totals), "eval_seconds": round(time.perf_counter() - start, 3)}
        if counters is not None:
            counters.start_time += record["eval_seconds"]
        return record

    def _metrics(self, totals: list[float]) -> dict:
        record = {}
        if self.loss_set is not None:
            loss, tokens, num_bytes = totals[:3]
            record.update(eval_loss=loss / max(tokens, 1), eval_bits_per_byte=bits_per_byte(loss, int(num_bytes)))
            totals = totals[3:]
        results = []
        for task, (correct, total) in zip(self.tasks, zip(totals[0::2], totals[1::2])):
            record[f"eval/{task.name}_accuracy"] = correct / total
            record[f"eval/{task.name}_majority_baseline"] = self.baselines[task.name]
            # ChatCORE centers by random guessing; exact match has no guessing (chance 0) but a constant answer
            # scores its majority baseline, so the floor is the larger of the two.
            results.append((correct / total, max(task.chance, self.baselines[task.name])))
        if results:
            record["eval/centered_accuracy"] = centered_accuracy(results)
        return record

    def _forward(self, model, batch: dict, **extra):
        inputs = {key: batch[key].to(self.accelerator.device) for key in MODEL_INPUTS if key in batch}
        return model(**inputs, use_cache=False, **extra)

    def _dummy(self) -> dict:
        """A one-token batch that trains nothing: a rank with a smaller share runs it so every rank's forward
        passes pair up under ZeRO-3; its result is dropped."""
        return collate([], [], True, self.pad_id)

    def _loss_sums(self, model) -> list[float]:
        loss, tokens = 0.0, 0
        for i in range(self.loss_forwards):
            mine = i < len(self.loss_batches)
            batch = collate(*self.loss_set.examples([row for row, _ in self.loss_batches[i]]), self.args.padding_free,
                            self.pad_id) if mine else self._dummy()
            targets = batch["target_ids"].to(self.accelerator.device)
            if self.args.use_liger_kernel:  # a ChunkedLossModel: no full logits
                loss_sum = self._forward(model, batch, target_ids=targets, num_chunks=self.loss_chunks[i])
            else:
                loss_sum = token_loss_sum(self._forward(model, batch).logits, targets)
            if mine:
                loss, tokens = loss + float(loss_sum), tokens + batch["num_trained_tokens"]
        return [loss, tokens]

    def _task_counts(self, model, task) -> list[float]:
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if isinstance(task, GenerationTask):
            batches, forwards = rank_batches([1] * len(task.answers), rank, world, self.batch_size)
            correct = self._generate_correct(model, task, batches, forwards)
        else:
            sizes = [len(q.choices) for q in task.questions]
            batches, forwards = rank_batches(sizes, rank, world, self.batch_size)
            correct = self._choices_correct(model, task, batches, forwards)
        return [correct, len(range(rank, len(task), world))]

    def _generate_correct(self, model, task: GenerationTask, batches, forwards: int) -> int:
        from transformers import GenerationConfig

        lm = self.accelerator.unwrap_model(model)
        lm = lm.lm if isinstance(lm, ChunkedLossModel) else lm
        # A fresh config: greedy whatever sampling settings the model's own generation config carries.
        config = GenerationConfig(max_new_tokens=task.max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
                                  pad_token_id=self.pad_id, use_cache=True)
        correct = 0
        for i in range(forwards):
            items = [item for item, _ in batches[i]] if i < len(batches) else [0]  # a dummy call, result dropped
            input_ids, attention_mask = left_padded([task.prompts[item] for item in items], self.pad_id)
            output = lm.generate(input_ids=input_ids.to(self.accelerator.device),
                                 attention_mask=attention_mask.to(self.accelerator.device), generation_config=config,
                                 synced_gpus=self.accelerator.num_processes > 1)
            if i < len(batches):
                new = output[:, input_ids.shape[1]:].tolist()
                correct += sum(task.correct(reply_text(self.tokenizer, tokens, self.stop_ids), task.answers[item])
                               for tokens, item in zip(new, items))
        return correct

    def _choices_correct(self, model, task: ChoiceTask, batches, forwards: int) -> int:
        logliks: dict[int, dict[int, float]] = {}
        for i in range(forwards):
            units = batches[i] if i < len(batches) else []
            pairs = [task.options[q][o] for q, o in units]
            batch = collate([p[0] for p in pairs], [p[1] for p in pairs], self.args.padding_free,
                            self.pad_id) if units else self._dummy()
            sums = example_loss_sums(self._forward(model, batch).logits, batch, max(len(units), 1)).tolist()
            for (question, option), loss_sum in zip(units, sums):
                logliks.setdefault(question, {})[option] = -loss_sum
        return sum(best_option([scores[o] for o in range(len(scores))]) == task.questions[q].answer
                   for q, scores in logliks.items())


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (generation appends on the right), with their attention mask."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------------------
# What finetune.py calls
# ----------------------------------------------------------------------------------------------------------------
def prepare_evaluation(args, tokenizer, accelerator, mixture: TokenizedMixture
                       ) -> tuple[TokenizedMixture, Evaluator | None]:
    """(the training mixture, less --eval_fraction's held-out share; the Evaluator, or None without eval flags)."""
    from open_instruct.args import has_eval

    if not has_eval(args):
        return mixture, None
    loss_set = None
    if args.eval_fraction is not None:
        mixture, loss_set = split_held_out(mixture, args.eval_fraction, args.seed)
        logger.info("--eval_fraction %s: %d examples held out for evaluation, %d left to train on.",
                    args.eval_fraction, len(loss_set), len(mixture))
    elif args.eval_dataset_mixer_list:
        loss_set = eval_mixture(args, tokenizer, accelerator)
    return mixture, Evaluator.build(args, tokenizer, accelerator, loss_set)


def is_eval_record(record: dict) -> bool:
    return "eval_seconds" in record


def eval_summary(metrics_path: str | Path) -> dict:
    """initial_* from the step-0 evaluation, final_* from the last one and best_* (lowest loss or bits per byte,
    highest accuracy; none for the fixed majority baselines) with the step it came at, read back from metrics.jsonl
    (which keeps them across a resume); 'eval/x' becomes 'eval_x'."""
    path = Path(metrics_path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    evals = [r for r in records if is_eval_record(r)]
    summary = {}
    for prefix, record in (("initial", next((r for r in evals if r["step"] == 0), None)),
                           ("final", evals[-1] if evals else None)):
        for key, value in (record or {}).items():
            if key not in ("step", "eval_seconds"):
                summary[f"{prefix}_{key.replace('/', '_')}"] = value
    for key in dict.fromkeys(k for r in evals for k in r if k not in ("step", "eval_seconds")
                             and not k.endswith("_majority_baseline")):
        lower_is_better = not key.endswith("accuracy")  # eval_loss, eval_bits_per_byte
        scored = [r for r in evals if key in r]
        best = (min if lower_is_better else max)(scored, key=lambda r: r[key])  # the first of equals
        name = key.replace("/", "_")
        summary[f"best_{name}"], summary[f"best_{name}_step"] = best[key], best["step"]
    return summary
