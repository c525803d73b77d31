"""The course's text side: a word-level tokenizer for the shapes captions and a tiny CLIP.

Stable Diffusion reads a prompt with CLIP's tokenizer and text encoder. Ours are the same
classes at toy size: a ``tokenizers`` word-level model wrapped as a ``transformers``
``PreTrainedTokenizerFast`` (pads to ``max_length`` like CLIP's), and a ``CLIPModel`` built
from a config and trained contrastively on the shapes and their captions (chapter 4; the zoo
recipe ``"tiny_clip"``). Its ``text_model`` is the frozen text encoder of chapters 4-9; the
full model gives a CLIP-style prompt-adherence score (:func:`clip_score`).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from helpers.data import COLOURS, POSITIONS, SHAPES, SIZES

__all__ = [
    "MAX_LENGTH",
    "SPECIAL_TOKENS",
    "VOCAB",
    "clip_embeddings",
    "clip_loss",
    "clip_score",
    "VIDEO_WORDS",
    "add_words",
    "encode_prompts",
    "retrieve",
    "shapes_tokenizer",
    "tiny_clip",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<unk>", "<eos>")  # ids 0..3; eos != 2, see tiny_clip
# Every word of the captions, then a few words no caption uses (later chapters teach them).
_CAPTION_WORDS = ["a", "on", "the", "at", "in", *SIZES, *COLOURS, *SHAPES, *POSITIONS]
_SPARE_WORDS = ["striped", "orange", "pink", "dotted", "photo", "of", "and", "big"]
VOCAB = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *_CAPTION_WORDS, *_SPARE_WORDS])}
MAX_LENGTH = 12  # <bos> + the longest caption (7 words) + <eos>, with room to spare
VIDEO_WORDS = ("moving", "bouncing", "changing", "from", "to")  # the clips' captions (chapter 9.2)


def shapes_tokenizer(max_length: int = MAX_LENGTH, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`VOCAB`: ``"a red circle"`` -> ``<bos> a red circle <eos> <pad>...``.

    Called like CLIP's tokenizer in a diffusers pipeline:
    ``tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True)``.
    Unknown words become ``<unk>``; case and punctuation are ignored. ``extra_words`` get the
    ids after :data:`VOCAB`'s, so every word already known keeps its id (see :func:`add_words`).
    """
    extra = [w.lower() for w in extra_words]
    if len(set(extra)) != len(extra) or any(not w.isalpha() or w in VOCAB for w in extra):
        raise ValueError(f"extra_words must be distinct alphabetic words not in VOCAB; got {extra_words!r}")
    vocab = {**VOCAB, **{w: len(VOCAB) + i for i, w in enumerate(extra)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(",", " ")])
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", VOCAB["<bos>"]), ("<eos>", VOCAB["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def tiny_clip(hidden_size: int = 64, layers: int = 2, heads: int = 4, image_size: int = 32, patch_size: int = 8,
              projection_dim: int = 64) -> CLIPModel:
    """A ``CLIPModel`` (text and vision transformers) small enough to train in seconds on a CPU.

    ``eos_token_id`` is 3: transformers treats a CLIP whose eos id is 2 as a legacy model and
    pools the text at the largest token id instead of at ``<eos>``.
    """
    text = dict(vocab_size=len(VOCAB), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_LENGTH,
                pad_token_id=VOCAB["<pad>"], bos_token_id=VOCAB["<bos>"], eos_token_id=VOCAB["<eos>"],
                projection_dim=projection_dim)
    vision = dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size, num_channels=3,
                  projection_dim=projection_dim)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))


@torch.no_grad()
def add_words(text_encoder, words: tuple[str, ...] = VIDEO_WORDS, seed: int = 0, noise: float = 0.1):
    """Teach a frozen text encoder new words, the way textual inversion adds a token.

    Returns ``(tokenizer, text_encoder)``: a tokenizer with ``words`` after :data:`VOCAB`, and
    the encoder with its token-embedding table grown by as many rows
    (``resize_token_embeddings``). Each new row starts, as textual inversion's new token does,
    from an existing word's row: ``<unk>``'s, what the word was read as before, plus Gaussian
    noise of ``noise`` times the rows' standard deviation (drawn with ``seed``). So each new
    word gets its own state, close to the states the models downstream already know, and a
    model that reads the states learns what the words mean. Every old word keeps its id and its
    row, so old prompts encode exactly as before.
    """
    tokenizer = shapes_tokenizer(extra_words=tuple(words))
    table = text_encoder.get_input_embeddings().weight
    if table.shape[0] != len(VOCAB):
        raise ValueError(f"text_encoder must have the {len(VOCAB)}-word vocabulary of shapes_tokenizer(); "
                         f"its embedding table has {table.shape[0]} rows")
    if noise <= 0:
        raise ValueError(f"noise must be positive (else the new words are all <unk>); got {noise!r}")
    std, unk = table.std().item(), table[VOCAB["<unk>"]].clone()
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = text_encoder.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    new[len(VOCAB):] = unk + (torch.randn(len(words), new.shape[1], generator=g) * noise * std).to(new)
    return tokenizer, text_encoder


def _ids(tokenizer, prompts: list[str] | str, device) -> torch.Tensor:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def clip_loss(model: CLIPModel, batch) -> torch.Tensor:
    """The symmetric InfoNCE loss of CLIP, for ``helpers.training.train``: ``batch = (images, input_ids)``.

    Captions repeat within a batch (there are 180 distinct ones); a caption equal to the true
    one counts as a positive too, so the loss does not push apart images that share a caption.
    """
    images, ids = batch
    out = model(input_ids=ids, pixel_values=images)
    logits = out.logits_per_image  # (B, B): image i against caption j, times the learned temperature
    same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()  # caption j equals caption i
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                  + torch.sum(-target * logits.T.log_softmax(1), 1).mean())


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str] | str) -> torch.Tensor:
    """The per-token text states ``(B, MAX_LENGTH, hidden)`` that cross-attention reads, as in SD."""
    device = next(text_encoder.parameters()).device
    return text_encoder(_ids(tokenizer, prompts, device))[0]


@torch.no_grad()
def clip_embeddings(clip: CLIPModel, tokenizer, images: torch.Tensor | None = None, prompts=None) -> list[torch.Tensor]:
    """Unit-length CLIP embeddings of ``images`` and/or ``prompts`` (those given, in that order)."""
    device = next(clip.parameters()).device
    out = []
    if images is not None:
        feats = torch.cat([clip.get_image_features(pixel_values=b.to(device)).pooler_output for b in images.split(256)])
        out.append(torch.nn.functional.normalize(feats, dim=-1))
    if prompts is not None:
        feats = clip.get_text_features(input_ids=_ids(tokenizer, prompts, device)).pooler_output
        out.append(torch.nn.functional.normalize(feats, dim=-1))
    return out


def clip_score(clip: CLIPModel, tokenizer, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine similarity between each image and its prompt in CLIP space, one value per image.

    ``images`` are ``(N, 3, 32, 32)`` in ``[-1, 1]``; a higher score is a better match. (The
    "CLIPScore" of Hessel et al. 2021 is ``100 * max(cos, 0)`` with OpenAI's CLIP; ours is the
    raw cosine with the course's tiny CLIP, comparable only within this course.)
    """
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must have the same length; got {len(images)} and {len(prompts)}")
    img, txt = clip_embeddings(clip, tokenizer, images, prompts)
    return (img * txt).sum(-1).cpu()


def retrieve(clip: CLIPModel, tokenizer, images: torch.Tensor, candidates: list[str]) -> list[str]:
    """For each image, the caption among ``candidates`` that CLIP finds most similar (zero-shot retrieval)."""
    img, txt = clip_embeddings(clip, tokenizer, images, list(candidates))
    return [candidates[i] for i in (img @ txt.T).argmax(1).tolist()]
