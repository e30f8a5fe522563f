"""Build randomly initialised checkpoints in the official BAAI layout, offline.

Used by the test-suite (tiny models, seconds to build) and by the benchmarks (a model with
BGE-M3's exact shape: 24 layers, hidden 1024, 16 heads, intermediate 4096). The tokenizer is a
SentencePiece-Unigram model trained on the fly with ``tokenizers`` on a small multilingual
corpus, saved as an XLM-R fast tokenizer (``<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SAMPLE_TEXTS",
    "CountingClient",
    "build_m3_checkpoint",
    "build_reranker_checkpoint",
    "build_tokenizer",
    "milvus_lite_server",
    "refused_upserts",
]

SAMPLE_TEXTS: list[str] = [
    "BGE-M3 produces dense, sparse and multi-vector representations in one forward pass.",
    "Retrieval augmented generation combines a retriever with a large language model.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and its largest city.",
    "Python is a programming language that lets you work quickly.",
    "Hybrid search fuses lexical matching with semantic similarity for better recall.",
    "ColBERT scores a document by the maximum similarity of each query token.",
    "The weather today is sunny with a light breeze from the west.",
    "机器学习是人工智能的一个分支，研究计算机如何从数据中学习。",
    "北京是中华人民共和国的首都，也是政治和文化中心。",
    "检索增强生成将检索器与大型语言模型结合起来。",
    "今天天气很好，我们去公园散步吧。",
    "稀疏向量和稠密向量可以一起用于混合检索。",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "التعلم الآلي هو فرع من فروع الذكاء الاصطناعي.",
    "يجمع البحث الهجين بين المطابقة المعجمية والتشابه الدلالي.",
    "الطقس اليوم مشمس مع نسيم خفيف.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "La recherche hybride combine la correspondance lexicale et la similarité sémantique.",
    "El aprendizaje automático es una rama de la inteligencia artificial.",
    "Машинное обучение — это раздел искусственного интеллекта.",
    "機械学習は人工知能の一分野です。東京は日本の首都です。",
    "Mixed text: BGE-M3 支持多语言 retrieval и поиск بحث in 100+ languages.",
]

_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def build_tokenizer(
    out_dir: str | Path, vocab_size: int = 1000, texts: list[str] | None = None
) -> Any:
    """Train a SentencePiece-Unigram tokenizer and save it as an XLM-R fast tokenizer.

    Returns:
        The loaded ``transformers`` tokenizer.
    """
    import transformers
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing

    # transformers 4.x name; in 5.x an alias of the tokenizers-backed XLMRobertaTokenizer
    fast = getattr(transformers, "XLMRobertaTokenizerFast", None)
    TokenizerClass: Any = fast or transformers.XLMRobertaTokenizer

    corpus = (texts or SAMPLE_TEXTS) * 20
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        corpus,
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        unk_token="<unk>",
        show_progress=False,
    )
    sp._tokenizer.model = _canonical_unigram(json.loads(sp._tokenizer.to_str())["model"]["vocab"])
    # XLM-R's template, as transformers' XLMRobertaConverter writes it: transformers 5 adds it
    # by itself, 4.x keeps the bare tokenizer's (none: no <s> </s>, empty text -> 0 tokens)
    sp._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tok = TokenizerClass(
        tokenizer_object=sp._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    tok.model_max_length = 8192
    tok.save_pretrained(str(out_dir))
    return tok


def _canonical_unigram(trained: list[list[Any]]) -> Any:
    """The trained Unigram vocabulary in an order that is the same in every process.

    The trainer breaks ties with a hash map, so from one process to the next the pieces come
    in another order (other token ids, so another random model) and their scores differ in
    the last bits. Required characters that training pruned are appended with scores falling
    by 1e-4 in hash order; that run gets one shared score. The result: specials first, then
    pieces by rounded score, ties by piece.
    """
    from tokenizers.models import Unigram

    pieces = sorted(
        ((p, round(float(score), 8)) for p, score in trained if p not in _SPECIALS),
        key=lambda ps: -ps[1],
    )
    tail = len(pieces) - 1
    while tail > 0 and any(
        abs(pieces[tail - 1][1] - pieces[tail][1] - step) < 1e-7 for step in (0.0, 1e-4)
    ):
        tail -= 1
    if tail < len(pieces) - 1:
        top = pieces[tail][1]
        pieces[tail:] = [(p, top) for p, _ in pieces[tail:]]
    pieces.sort(key=lambda ps: (-ps[1], ps[0]))
    return Unigram(
        [(p, 0.0) for p in _SPECIALS] + pieces, unk_id=_SPECIALS.index("<unk>"), byte_fallback=False
    )


def _config(
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int,
    **extra: Any,
) -> Any:
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions + 2,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **extra,
    )


def build_m3_checkpoint(
    out_dir: str | Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    colbert_dim: int | None = None,
    max_positions: int = 512,
    vocab_size: int | None = None,
    weights_format: str = "safetensors",
    with_heads: bool = True,
    initializer_range: float = 0.5,
    seed: int = 0,
    tokenizer_texts: list[str] | None = None,
    tokenizer_vocab: int = 1000,
) -> Path:
    """Write a random BGE-M3-layout checkpoint (``XLMRobertaModel`` + heads + tokenizer).

    Args:
        out_dir: Directory to create.
        hidden, layers, heads, intermediate: backbone shape (BGE-M3: 1024, 24, 16, 4096).
        colbert_dim: ColBERT head output size (default ``hidden``, as BGE-M3).
        max_positions: Longest input in tokens.
        vocab_size: Embedding rows (default: the trained tokenizer's size; BGE-M3: 250002).
        weights_format: ``"safetensors"`` (``model.safetensors``) or ``"bin"``
            (``pytorch_model.bin``).
        with_heads: Write ``colbert_linear.pt`` and ``sparse_linear.pt`` (False: dense-only model).
        initializer_range: Std of the random weights; 0.5 (not BERT's 0.02) keeps the tiny
            model's embeddings of different texts apart, so ranking tests can tell them apart.
        seed: RNG seed; the same seed gives the same weights.
        tokenizer_texts: What the tokenizer is trained on (default: the test sentences).
        tokenizer_vocab: The tokenizer's size. The default (1000 pieces, the test sentences)
            cuts real passages into ~1.4 characters per token; trained on a collection's
            texts with ~16,000 pieces, it cuts them about as BGE-M3's tokenizer does (beir-mini
            msmarco: 81 tokens per passage).
    """
    from transformers import XLMRobertaModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, tokenizer_vocab, tokenizer_texts)
    torch.manual_seed(seed)
    config = _config(
        max(vocab_size or 0, len(tok)),
        hidden,
        layers,
        heads,
        intermediate,
        max_positions,
        initializer_range=initializer_range,
    )
    model = XLMRobertaModel(config, add_pooling_layer=False).eval()
    _save(model, out, weights_format)
    if with_heads:
        colbert = torch.nn.Linear(hidden, colbert_dim or hidden)
        sparse = torch.nn.Linear(hidden, 1)
        # most tokens get a positive, varied weight: random hidden states share a large
        # common component, so the bias is centred on this model's own projections (60% > 0)
        torch.nn.init.normal_(sparse.weight, 0.0, 0.3)
        with torch.no_grad():
            batch = tok(SAMPLE_TEXTS, padding=True, truncation=True, return_tensors="pt")
            hidden_states = model(**batch).last_hidden_state[batch["attention_mask"].bool()]
            proj = (hidden_states @ sparse.weight.T).reshape(-1)
            sparse.bias.fill_(-float(torch.quantile(proj, 0.4)))
        torch.save(colbert.state_dict(), out / "colbert_linear.pt")
        torch.save(sparse.state_dict(), out / "sparse_linear.pt")
    return out


def build_reranker_checkpoint(
    out_dir: str | Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    max_positions: int = 512,
    initializer_range: float = 0.5,
    seed: int = 1,
) -> Path:
    """Write a random ``XLMRobertaForSequenceClassification`` (one label) checkpoint."""
    from transformers import XLMRobertaForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    config = _config(
        len(tok),
        hidden,
        layers,
        heads,
        intermediate,
        max_positions,
        num_labels=1,
        initializer_range=initializer_range,
    )
    model = XLMRobertaForSequenceClassification(config).eval()
    _save(model, out, "safetensors")
    return out


def _save(model: Any, out: Path, weights_format: str) -> None:
    if weights_format == "safetensors":
        model.save_pretrained(str(out))
    elif weights_format == "bin":
        model.config.save_pretrained(str(out))
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    else:
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")


@contextmanager
def milvus_lite_server(data_dir: str | Path, timeout: float = 60.0) -> Iterator[str]:
    """``milvus-lite server`` as a separate process on a free 127.0.0.1 port, stopped on exit.

    Yields:
        Its URI, ``http://127.0.0.1:PORT`` (for ``MilvusBackend``).

    Raises:
        RuntimeError: it exited or did not listen within ``timeout`` seconds.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["milvus-lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("milvus-lite server did not start on 127.0.0.1") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


class CountingClient:
    """Wraps a real engine client and records the name of every method called (the round
    trips a search makes)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*a: Any, **kw: Any) -> Any:
            self.calls.append(name)
            return attr(*a, **kw)

        return call


@contextmanager
def refused_upserts(backend: Any, at: int, error: BaseException) -> Iterator[list[int]]:
    """Inject a fault into the real client of a server engine (Milvus, Qdrant): its
    ``at``-th upsert into ``backend.collection`` raises ``error`` instead of writing
    (upserts into other collections pass through); the client is restored on exit.

    Args:
        backend: A :class:`~m3_rag.backends.MilvusBackend` or
            :class:`~m3_rag.backends.QdrantBackend` (its ``client`` and ``collection``).
        at: Which upsert fails, from 1.
        error: What it raises (``SystemExit`` stands for a killed process).

    Yields:
        The number of rows of every upsert into the collection, failed one included.
    """
    client = backend.client
    real = client.upsert
    had = "upsert" in vars(client)
    calls: list[int] = []

    def upsert(collection: str, rows: Any, *args: Any, **kw: Any) -> Any:
        if collection == backend.collection:
            calls.append(len(rows))
            if len(calls) == at:
                raise error
        return real(collection, rows, *args, **kw)

    client.upsert = upsert
    try:
        yield calls
    finally:
        if had:
            client.upsert = real
        else:
            del client.upsert
