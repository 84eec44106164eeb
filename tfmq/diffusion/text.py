"""Text conditioning for Stable-Diffusion-style folders (``tokenizer/`` + ``text_encoder/``), offline.

- :func:`build_clip_tokenizer` learns a byte-level BPE vocabulary in CLIP's format (``vocab.json`` +
  ``merges.txt``: lower-cased words, bytes mapped to printable characters, ``</w>`` ending a word,
  ``<|startoftext|>`` / ``<|endoftext|>``) from a caption corpus, so a ``transformers.CLIPTokenizer``
  loads it unchanged; the merges are deterministic (ties broken by the pair itself).
- :func:`read_prompts` reads a prompt file (one prompt per line, the format of the calibration and
  evaluation prompt files named in ``params.yaml``) or, for a ``.json`` path, an MS-COCO captions file
  (:func:`read_coco_captions`: one caption per image, the paper's evaluation prompts).
- the prompts' text-encoder states are ``tfmq.diffusion.pipelines.encode_prompts`` (what
  ``StableDiffusionPipeline`` does with a prompt).

Only the UNet is ever quantized: the text encoder stays full precision.
"""
from __future__ import annotations

import collections
import json
import os
import random
import re
from pathlib import Path

import torch

START, END = "<|startoftext|>", "<|endoftext|>"
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")  # CLIP's pattern without its contractions and unicode classes


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's map of the 256 bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _words(text: str) -> list[str]:
    return _WORD.findall(" ".join(text.lower().split()))


def build_clip_tokenizer(corpus: list[str], out_dir: str | os.PathLike, num_merges: int | None = None,
                         model_max_length: int = 77):
    """Learn BPE merges on ``corpus`` and write a ``CLIPTokenizer`` folder to ``out_dir``; return the tokenizer.

    Args:
        corpus: captions (the calibration and evaluation prompts need not be in it: unseen words fall
            back to smaller pieces, down to single bytes).
        num_merges: merges to learn (``None``: until every corpus word is one token).
        model_max_length: the padded prompt length (77 in Stable Diffusion).
    """
    from transformers import CLIPTokenizer

    b2u = bytes_to_unicode()
    freq = collections.Counter(w for line in corpus for w in _words(line))
    if not freq:
        raise ValueError("build_clip_tokenizer: the corpus has no words; expected a list of captions")
    # every word as a tuple of byte-characters, the last one carrying the end-of-word marker
    splits = {}
    for w in freq:
        chars = [b2u[b] for b in w.encode("utf-8")]
        splits[w] = tuple(chars[:-1]) + (chars[-1] + "</w>",)
    merges: list[tuple[str, str]] = []
    while num_merges is None or len(merges) < num_merges:
        pairs = collections.Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += freq[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = tuple(out)
    base = list(b2u.values())
    vocab_list = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [START, END]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=model_max_length)
    tok.save_pretrained(out)
    return tok


COCO_EXPECTED = ("expected an MS-COCO captions JSON (annotations/captions_val2014.json layout) "
                 "or a text file with one prompt per line")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a prompt file; sample j of a run gets prompt j mod P.

    Args:
        path: a text file, one prompt per line (surrounding blanks removed, blank lines skipped), or a path ending
            in ``.json`` (any case): an MS-COCO captions file, read by :func:`read_coco_captions` with seed 0
            (one caption per image, in a seeded random order).

    Example:
        >>> prompts = read_prompts("prompts/fashion-val.txt")
        >>> coco = read_prompts("annotations/captions_val2014.json")  # one caption per image, seeded order
    """
    p = Path(path)
    if p.suffix.lower() == ".json":
        return read_coco_captions(p)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompt file {p}: cannot read it ({e}); expected a UTF-8 text file, one prompt per line") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise ValueError(f"prompt file {p} holds no prompt; expected one prompt per line")
    return prompts


def read_coco_captions(path: str | os.PathLike, seed: int = 0) -> list[str]:
    """One caption per image of an MS-COCO captions file, in a seeded random order of the images.

    The rule, exactly: for each ``image_id`` take the annotation with the lowest ``id`` among those whose
    caption is not blank; strip it and collapse internal whitespace (newlines included) to single spaces; sort
    the image ids ascending and shuffle that list in place with ``random.Random(seed).shuffle``; return the
    captions in that order. So sample j of a run gets caption j mod P, and the first N captions are a
    deterministic random subset of N images. Images without annotations (``"images"`` entries) are ignored.

    Args:
        path: a JSON file in the layout of ``annotations/captions_val2014.json``:
            ``{"images": [...], "annotations": [{"image_id": int, "id": int, "caption": str}, ...]}``.
        seed: the order's seed (default 0, what :func:`read_prompts` uses).

    Returns:
        P captions, P the number of images with a caption.

    Example:
        >>> caps = read_coco_captions("annotations/captions_val2014.json")  # 40504 captions
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"prompt file {p}: cannot read it as JSON ({' '.join(str(e).split())}); {COCO_EXPECTED}") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"prompt file {p}: no \"annotations\" list at the top level; {COCO_EXPECTED}")
    best: dict[int, tuple[int, str]] = {}  # image_id -> (annotation id, caption)
    for k, a in enumerate(anns):
        ok = isinstance(a, dict) and isinstance(a.get("caption"), str) and all(
            isinstance(a.get(f), int) and not isinstance(a.get(f), bool) for f in ("image_id", "id"))
        if not ok:
            raise ValueError(f"prompt file {p}: annotation {k} is {str(a)[:80]!r}, not "
                             f"{{\"image_id\": int, \"id\": int, \"caption\": str}}; {COCO_EXPECTED}")
        caption = " ".join(a["caption"].split())
        if caption and (a["image_id"] not in best or a["id"] < best[a["image_id"]][0]):
            best[a["image_id"]] = (a["id"], caption)
    if not best:
        raise ValueError(f"prompt file {p}: no annotation holds a caption; {COCO_EXPECTED}")
    order = sorted(best)
    random.Random(seed).shuffle(order)
    return [best[i][1] for i in order]


# --- captions of a labelled image set (the embedded text-guided default) --------------------------------
TRAIN_TEMPLATES = ("a photo of a {}", "a picture of a {}", "a black and white photo of a {}", "an image of a {}")
HELDOUT_TEMPLATES = ("a grayscale picture of a {}", "a small photo of the {}")  # evaluation only, like COCO val


def class_phrase(name: str) -> str:
    """``"T-shirt/top" -> "t-shirt or top"``: a class name as it appears in a caption."""
    return " or ".join(part.strip() for part in name.lower().split("/"))


def captions(class_names: list[str] | tuple[str, ...], labels, templates=TRAIN_TEMPLATES, seed: int = 0) -> list[str]:
    """One caption per label: a template (drawn with ``seed``) filled with the class phrase."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(templates), (len(labels),), generator=g).tolist()
    return [templates[k].format(class_phrase(class_names[int(c)])) for k, c in zip(pick, labels)]


def class_of_prompt(prompt: str, class_names: list[str] | tuple[str, ...]) -> int | None:
    """The class a prompt names (the longest class phrase in it: "t-shirt or top" before "shirt"), or None."""
    text = " ".join(prompt.lower().split())
    for c in sorted(range(len(class_names)), key=lambda c: -len(class_phrase(class_names[c]))):
        if re.search(rf"(?<![\w-]){re.escape(class_phrase(class_names[c]))}(?![\w-])", text):
            return c
    return None


def build_text_encoder(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                       intermediate_size: int | None = None, seed: int = 0):
    """A freshly initialised ``transformers.CLIPTextModel`` for ``tokenizer`` (its vocabulary, its padded length,
    its end-of-text id: the pooled output is taken there, as in CLIP), seeded; eval mode, no grads.

    The embedded text-guided default keeps it frozen at this initialisation while its UNet trains, as Stable
    Diffusion keeps its (pretrained) CLIP text encoder frozen: no pretrained text encoder exists offline,
    and a fixed random encoder still maps each prompt to distinct, deterministic states that the UNet's
    cross-attention learns to read (docs/method.md section 10).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, intermediate_size=intermediate_size or 4 * hidden_size,
                         max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden_size,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def caption_corpus(class_names, templates=TRAIN_TEMPLATES + HELDOUT_TEMPLATES) -> list[str]:
    """Every caption the templates make of the class names (the tokenizer's corpus), in template-major order."""
    return [t.format(class_phrase(c)) for t in templates for c in class_names]
