"""Self-distillation data (docs/method.md §5): a block-diffusion model's own greedy trajectories on SFT prompts.

Runs inside Ray Data actors of `pipelines/distill.py` (one `fdllm.Engine` per actor: CPU here, a GPU
per actor on a cluster). Each SFT record (either schema of `pipelines.data`) is cut before its final
assistant answer; the engine decodes the prompt greedily in block-diffusion mode, and the trajectory
replaces the answer when its final answer equals the reference's (reasoning in `<think>...</think>`
aside, surrounding whitespace ignored: the world's tasks have exact answers). A wrong trajectory drops
the record, or keeps it with the reference answer (`wrong="reference"`). Every record gets a status
(`STATUSES`, or `bad_<reason>` for a row the data pipeline would skip or the engine would refuse:
a prompt that leaves no room for `max_new_tokens` in its context, or holds the mask token), which the
driver counts: a bad row never stops a run.

Plain Python over one batch at a time; tested without Ray.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from fdllm.tokenizer import MASK_TOKEN
from pipelines.data import CONTEXT_TURN, BadRow, raw_rows, record_to_messages, strip_reasoning_text

if TYPE_CHECKING:
    import pyarrow

    import fdllm

log = logging.getLogger(__name__)

CORRECT, DROPPED, REPLACED = "correct", "wrong_dropped", "wrong_replaced"
STATUSES = (CORRECT, DROPPED, REPLACED)


def final_answer(text: str) -> str | None:
    """The answer part of an assistant turn (reasoning removed, whitespace stripped); None when its
    `<think>` tags do not balance (a trajectory cut off mid-thought)."""
    try:
        return strip_reasoning_text(text).strip()
    except BadRow:
        return None


def is_correct(trajectory: str, reference: str) -> bool:
    answer = final_answer(trajectory)
    return answer is not None and answer == final_answer(reference)


def distilled_record(messages: list[dict[str, str]], answer: str) -> dict[str, Any]:
    """A plain chat record (`pipelines.data` reads it) of the prompt turns and `answer` as the reply. Earlier
    assistant turns are the data's, not the model's: marked context, so that only the trajectory trains."""
    context = [{**m, CONTEXT_TURN: True} if m["role"] == "assistant" else m for m in messages[:-1]]
    return {"messages": [*context, {"role": "assistant", "content": answer}]}


def prompt_token_ids(engine: "fdllm.Engine", messages: list[dict[str, str]]) -> list[int]:
    """The prompt of a conversation (all but its final answer) as the engine decodes it: the
    tokenizer's chat template with the generation prompt, tokenized as inference does."""
    from pipelines.evaluate import prompt_ids

    return prompt_ids(engine, {"prompt": messages[-2]["content"], "messages": messages[:-1]})


def split_windows(batch: "pyarrow.Table") -> dict[str, np.ndarray]:
    """Pack windows (`pipelines.data.read_raw_records`) -> one row per record, so actors get
    batches of `trajectory_batch_size` records, not of whole windows."""
    return {"lines": np.array(raw_rows(batch), dtype=object)}


class TrajectoryGenerator:
    """A Ray Data actor: loads the model once, then turns batches of raw SFT rows into distillation
    records (`record`, JSON text, empty when dropped) and their `status`."""

    def __init__(self, model: str, max_new_tokens: int, threshold: float | None, wrong: str, device: str = "cpu",
                 max_num_seqs: int = 64) -> None:
        import fdllm
        from fdllm.storage import local_checkpoint

        if wrong not in ("drop", "reference"):
            raise ValueError(f"wrong must be 'drop' or 'reference', got {wrong!r}")
        self.engine = fdllm.Engine.from_pretrained(local_checkpoint(model), device=device,
                                                   engine_config=fdllm.EngineConfig(max_num_seqs=max_num_seqs))
        self.params = fdllm.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, threshold=threshold,
                                           mode="diffusion")
        self.wrong = wrong

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation's prompt ids, or BadRow when the engine would refuse it: one such row would
        fail `generate` for its whole batch, and so the whole Ray Data run."""
        try:
            ids = prompt_token_ids(self.engine, messages)
        except Exception as e:  # noqa: BLE001 - templates reject conversations with any error (raise_exception)
            raise BadRow("template_error", f"{type(e).__name__}: {e}") from None
        if self.engine.config.mask_token_id in ids:
            raise BadRow("mask_token", f"the prompt contains {MASK_TOKEN}")
        # the engine's limits: its context, and its KV cache (a request needs a page per block)
        limit = min(self.engine.max_model_len, self.engine.num_pages * self.engine.config.block_size)
        if len(ids) + self.params.max_new_tokens > limit:
            raise BadRow("too_long", f"prompt ({len(ids)} tokens) + max_new_tokens ({self.params.max_new_tokens}) "
                         f"> the engine's {limit}")
        return ids

    def __call__(self, batch: "pyarrow.Table") -> dict[str, np.ndarray]:
        return self.process(raw_rows(batch))

    def process(self, rows: list[bytes | str | dict[str, Any]]) -> dict[str, np.ndarray]:
        """Columns `record` and `status`, one row per input row."""
        from pipelines.data import parse_jsonl_line

        records, statuses, todo, prompts = [""] * len(rows), [""] * len(rows), [], []
        for i, row in enumerate(rows):
            try:
                record = parse_jsonl_line(row) if isinstance(row, (str, bytes)) else row
                messages = record_to_messages(record)
                prompts.append(self.prompt(messages))
                todo.append((i, messages))
            except BadRow as e:
                statuses[i] = f"bad_{e.reason}"
        if todo:
            results = self.engine.generate(prompts, self.params)
            for (i, messages), result in zip(todo, results):
                reference = messages[-1]["content"]
                if is_correct(result.text, reference):
                    records[i], statuses[i] = json.dumps(distilled_record(messages, result.text)), CORRECT
                elif self.wrong == "reference":
                    records[i], statuses[i] = json.dumps(distilled_record(messages, reference)), REPLACED
                else:
                    statuses[i] = DROPPED
        return {"record": np.array(records, dtype=object), "status": np.array(statuses, dtype=object)}
