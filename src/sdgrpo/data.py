"""Raw documents -> prompts: passages cut by token count into a ``prompt`` and its true ``continuation``.

Each document is tokenized once with offsets. Windows of ``prompt_tokens + continuation_tokens`` tokens start at
paragraph starts (else sentence starts) and never overlap, so a held-out prompt's continuation is never a training
prompt. ``prompt`` and ``continuation`` are exact substrings of the source text, split at a token boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import statistics
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdgrpo.errors import UserError
from sdgrpo.sources import Document, ReadReport, iter_documents
from sdgrpo.textio import write_atomic

logger = logging.getLogger(__name__)

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"[.!?;:][\"')\]]*\s+|\n")


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list, metadata={
        "help": "Text files or folders (.txt, .md, JSON/JSONL/CSV/Parquet records, saved datasets)."})
    output: str = field(default="", metadata={"help": "A new folder for the prepared dataset (train and test splits)."})
    model: str | None = field(default=None, metadata={
        "help": "The tokenizer that counts tokens: the model you will train (default: the shipped tiny model)."})
    text_field: str = field(default="text", metadata={"help": "The field of JSON/CSV/Parquet records that holds text."})
    min_prompt_tokens: int = field(default=16, metadata={"help": "Shortest prompt, in tokens."})
    max_prompt_tokens: int = field(default=64, metadata={
        "help": "Longest prompt, in tokens; prompts end at a sentence or paragraph boundary where one falls between "
                "the two."})
    continuation_tokens: int = field(default=64, metadata={
        "help": "Tokens of the text that follows a prompt, kept as its continuation (sft's target, held-out bits "
                "per byte)."})
    min_continuation_tokens: int = field(default=8, metadata={
        "help": "A prompt whose text ends sooner than this many tokens after it is dropped."})
    test_size: float = field(default=0.05, metadata={"help": "Share of the prompts held out as the test split."})
    max_prompts: int | None = field(default=None, metadata={"help": "Keep at most this many prompts (default: all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the train/test split."})

    def __post_init__(self):
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise UserError(f"--min_prompt_tokens {self.min_prompt_tokens} / --max_prompt_tokens "
                            f"{self.max_prompt_tokens}: need 1 <= min <= max")
        if self.continuation_tokens < 1:
            raise UserError("--continuation_tokens must be at least 1")
        if not 0 <= self.test_size < 1:
            raise UserError(f"--test_size {self.test_size}: must be a fraction in [0, 1)")


def _boundaries(text: str) -> tuple[list[int], list[int]]:
    """Char offsets where a paragraph or a sentence starts (first non-space character)."""
    para = [0] + [m.end() for m in _PARAGRAPH.finditer(text)]
    sent = sorted(set(para) | {m.end() for m in _SENTENCE.finditer(text)})
    return para, sent


def _next_start(para: list[int], sent: list[int], char: int, window_chars: int) -> int | None:
    i = bisect_left(para, char)
    if i < len(para) and para[i] - char <= 2 * window_chars:
        return para[i]
    j = bisect_left(sent, char)
    return sent[j] if j < len(sent) else None


def _word_boundary(text: str, offsets, first: int, end: int, cfg: PrepareConfig) -> int:
    """Move a prompt's end token so the cut does not fall inside a word: back to the minimum, else forward."""

    def inside(e: int) -> bool:
        return e < len(offsets) and text[offsets[e - 1][1] - 1].isalnum() and text[offsets[e][0]].isalnum()

    for e in range(end, first + cfg.min_prompt_tokens - 1, -1):
        if not inside(e):
            return e
    for e in range(end + 1, min(first + cfg.max_prompt_tokens, len(offsets)) + 1):
        if not inside(e):
            return e
    return end


def cut_document(text: str, tokenizer, cfg: PrepareConfig, rng: random.Random) -> list[dict]:
    """Cut one document into prompt/continuation pairs (exact substrings split at token boundaries)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    if len(offsets) < cfg.min_prompt_tokens + cfg.min_continuation_tokens:
        return []
    token_starts = [s for s, _ in offsets]
    para, sent = _boundaries(text)
    out = []
    char = 0
    while True:
        tok = bisect_left(token_starts, char)
        if tok >= len(offsets):
            break
        prompt_len = rng.randint(cfg.min_prompt_tokens, cfg.max_prompt_tokens)
        end_prompt = _word_boundary(text, offsets, tok, tok + prompt_len, cfg)
        prompt_len = end_prompt - tok
        end_cont = min(end_prompt + cfg.continuation_tokens, len(offsets))
        if end_cont - end_prompt < cfg.min_continuation_tokens:
            break
        start_char = max(char, offsets[tok][0])
        cut = offsets[end_prompt - 1][1]
        prompt, continuation = text[start_char:cut], text[cut : offsets[end_cont - 1][1]]
        out.append({"prompt": prompt, "continuation": continuation, "prompt_tokens": prompt_len})
        window_chars = offsets[end_cont - 1][1] - start_char
        nxt = _next_start(para, sent, offsets[end_cont - 1][1], window_chars)
        if nxt is None:
            break
        char = nxt
    return out


BLOCK_CHARS = 250_000


def blocks(text: str, max_chars: int = BLOCK_CHARS) -> Iterator[str]:
    """A long document in blocks of at most ``max_chars`` characters, cut at paragraph starts (else at a line
    start, else at a space): the unit that is tokenized at once, so memory stays bounded on a single huge file.
    Windows never cross a block boundary. A document that fits is one block, itself."""
    start = 0
    while len(text) - start > max_chars:
        limit = start + max_chars
        cut = -1
        for m in _PARAGRAPH.finditer(text, start + 1, limit):
            cut = m.end()
        if cut <= start:
            cut = text.rfind("\n", start + 1, limit) + 1
        if cut <= start:
            cut = text.rfind(" ", start + 1, limit) + 1
        if cut <= start:
            cut = limit
        yield text[start:cut]
        start = cut
    yield text[start:]


def _usable(prompt: str) -> bool:
    letters = sum(ch.isalpha() for ch in prompt)
    return letters >= 8 and letters >= 0.4 * len(prompt.strip())


def _key(prompt: str) -> str:
    return hashlib.sha1(" ".join(prompt.lower().split()).encode()).hexdigest()


def build_examples(docs: Iterable[Document], tokenizer, cfg: PrepareConfig) -> tuple[list[dict], dict]:
    """All prompts from ``docs``, with near-empty and duplicate prompts dropped; returns (examples, counts)."""
    seen: set[str] = set()
    examples: list[dict] = []
    counts = {"documents": 0, "windows": 0, "dropped_near_empty": 0, "dropped_duplicate": 0}
    for doc in docs:
        counts["documents"] += 1
        bar = None
        if len(doc.text) > BLOCK_CHARS:  # a long document takes minutes to cut (with or without newlines): show how far
            from tqdm import tqdm

            bar = tqdm(total=len(doc.text), unit="char", unit_scale=True, desc=f"reading {doc.source}")
        for block in blocks(doc.text):
            # One generator per block, seeded by its content: the same text always gets the same cuts, whatever
            # the file order, so a copied document yields exact duplicate prompts that are then dropped.
            rng = random.Random(f"{cfg.seed}:{_key(block)}")
            for ex in cut_document(block, tokenizer, cfg, rng):
                counts["windows"] += 1
                if not _usable(ex["prompt"]):
                    counts["dropped_near_empty"] += 1
                    continue
                key = _key(ex["prompt"])
                if key in seen:
                    counts["dropped_duplicate"] += 1
                    continue
                seen.add(key)
                examples.append({**ex, "source": doc.source})
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()
    return examples, counts


def _stats(values: list[int]) -> dict:
    if not values:
        return {}
    return {"min": min(values), "mean": round(statistics.fmean(values), 1), "max": max(values)}


def prepare(cfg: PrepareConfig, tokenizer, extra: dict | None = None) -> dict:
    """Read, cut, split and save; returns the summary that is also written to ``prepare.json`` (with ``extra``).

    The folder is written under ``OUTPUT.partial`` and renamed to ``OUTPUT`` once whole (:func:`sdgrpo.folders.staged`:
    an older ``OUTPUT`` is replaced only where sdgrpo wrote it, and a second writer is refused); an output inside an
    input, or an input inside the output, is refused before anything is read."""
    from sdgrpo.folders import overlaps, staged

    for path in cfg.inputs:
        if overlaps(path, cfg.output):
            raise UserError(f"--output {cfg.output} and the input {path} overlap: a later prepare would read its own "
                            "output as text, or replacing it would remove the input; pass an --output outside the "
                            "inputs")
    with staged(cfg.output, "prepare") as folder:
        return _prepare_into(folder, cfg, tokenizer, extra)


def _prepare_into(folder: Path, cfg: PrepareConfig, tokenizer, extra: dict | None) -> dict:
    from datasets import Dataset, DatasetDict

    report = ReadReport()
    examples, counts = build_examples(iter_documents(cfg.inputs, cfg.text_field, report), tokenizer, cfg)
    if not examples:
        raise UserError(f"{', '.join(cfg.inputs)}: the text is too short to make any prompt of "
                        f"{cfg.min_prompt_tokens}+{cfg.min_continuation_tokens} tokens; lower --min_prompt_tokens")
    rng = random.Random(cfg.seed)
    rng.shuffle(examples)
    if cfg.max_prompts is not None:
        examples = examples[: cfg.max_prompts]
    n_test = round(len(examples) * cfg.test_size)
    if cfg.test_size > 0 and len(examples) >= 2:
        n_test = max(1, n_test)
    splits = {"train": examples[n_test:], "test": examples[:n_test]}
    if not splits["train"]:
        raise UserError(f"only {len(examples)} prompt(s): nothing left to train on; lower --test_size")
    out = folder
    # An empty split is left out: datasets saves it with no shards and then cannot load the folder back.
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items() if v}).save_to_disk(str(out))
    cont_tokens = [len(tokenizer(e["continuation"], add_special_tokens=False)["input_ids"]) for e in examples[:2000]]
    summary = {
        "files_read": report.files_read,
        "files_skipped": report.skipped,
        **counts,
        "prompts": len(examples),
        "train": len(splits["train"]),
        "test": len(splits["test"]),
        "prompt_tokens": _stats([e["prompt_tokens"] for e in examples]),
        "continuation_tokens": _stats(cont_tokens),
        "config": asdict(cfg),
        **(extra or {}),
    }
    write_atomic(out / "prepare.json", json.dumps(summary, indent=2))  # the marker that the folder is complete
    return summary


def load_prompts(path: str | None, split: str = "train", limit: int | None = None):
    """The ``split`` of a dataset saved by ``sdgrpo prepare`` (any saved dataset with a ``prompt`` column)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if not path:
        raise UserError("no prompts: pass --dataset_path DIR (a folder of your text, or one written by `sdgrpo "
                        "prepare`)")
    if not Path(path).is_dir():
        raise UserError(f"{path}: no such dataset folder; create it with `sdgrpo prepare TEXT --output {path}`")
    try:  # into memory: a map over it (SFTTrainer's tokenising) then writes no cache files into the user's folder
        ds = load_from_disk(path, keep_in_memory=True)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{path}: not a saved dataset ({err}); create it with `sdgrpo prepare`") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: has no {split!r} split (splits: {list(ds)})")
        ds = ds[split]
    assert isinstance(ds, Dataset)
    if "prompt" not in ds.column_names:
        raise UserError(f"{path}: dataset has no 'prompt' column (columns: {ds.column_names}); "
                        "make one with `sdgrpo prepare`")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def _raw_text(path: str | None) -> bool:
    from sdgrpo.sources import is_saved_dataset

    return bool(path) and Path(path).exists() and not is_saved_dataset(Path(path))


def prepared_location(path: str | None, output_dir: str) -> str | None:
    """Where the run reads its prompts from: ``path`` itself when it is a saved dataset (or missing), else the
    prepared copy ``output_dir/data``."""
    return str(Path(output_dir) / "data") if _raw_text(path) else path


def check_text_outside(path: str | None, output_dir: str) -> None:
    """Refuse raw text (not a saved dataset) that overlaps the run folder: text inside it could be replaced by the
    prepared copy or moved aside with the run, and a run folder inside the text would be read by the next run."""
    from sdgrpo.folders import overlaps

    if not _raw_text(path) or not overlaps(path, output_dir):
        return
    here, out = Path(path).resolve(), Path(output_dir).resolve()
    if out == here or here in out.parents:
        raise UserError(f"--output_dir {output_dir} is inside the text of --dataset_path {path}: the next run would "
                        "read this run's own files as text; pass an --output_dir outside it")
    raise UserError(f"--dataset_path {path} is inside --output_dir {output_dir}, where sdgrpo writes (raw text is "
                    f"prepared into {Path(output_dir) / 'data'}): move the text out of it or pass another --output_dir")


def prepared_or_raw(path: str | None, output_dir: str, model: str, args=None) -> str | None:
    """``path`` itself when it is a dataset saved by ``prepare``; raw text files or folders are prepared with the
    default options into ``output_dir/data`` (reused while the inputs and tokenizer are unchanged, rebuilt
    otherwise, where sdgrpo wrote it: see :func:`prepare`) and that folder is returned. Text that overlaps
    ``output_dir`` is refused (:func:`check_text_outside`). With several processes (``args``: the run's
    ``TrainingArguments``) the main one prepares while the others wait at the Trainer's barrier
    (``args.main_process_first``), then find its ``prepare.json``."""
    import contextlib

    if not _raw_text(path):
        return path
    check_text_outside(path, output_dir)
    target = Path(output_dir) / "data"
    fingerprint = _fingerprint(path, model)
    summary = target / "prepare.json"

    def ready() -> bool:
        try:
            return json.loads(summary.read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            return False

    main = args is None or args.process_index == 0
    with args.main_process_first(local=False, desc="preparing the text") if args else contextlib.nullcontext():
        if ready():
            if main:
                logger.info("raw text %s: using the prepared data in %s (inputs unchanged)", path, target)
            return str(target)
        if not main:
            raise UserError(f"{target}: the main process did not prepare {path}; run `sdgrpo prepare` first")
        from sdgrpo.modeling import load_tokenizer

        cfg = PrepareConfig(inputs=[path], output=str(target), model=model)
        result = prepare(cfg, load_tokenizer(model), extra={"fingerprint": fingerprint})
        logger.info("raw text %s: prepared with the default options into %s (%d prompts: %d train, %d test)",
                       path, target, result["prompts"], result["train"], result["test"])
        return str(target)


def _fingerprint(path: str, model: str) -> str:
    """Names, sizes and modification times of every file under ``path``, and the tokenizer's model."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha1(str(model).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
