"""``m4r export``: checkpoint -> model.onnx (+ model.fp16.onnx) + items.txt + manifest.json."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import M4RError


@click.command()
@click.option(
    "--ckpt", "ckpt", required=True, type=click.Path(path_type=Path), help="model.pt (m4r or RecBole)."
)
@click.option(
    "--out-dir", required=True, type=click.Path(path_type=Path), help="Directory for the artifacts."
)
@click.option(
    "--head",
    type=click.Choice(["scores", "topk", "embedding"]),
    default="scores",
    show_default=True,
    help="scores: [batch, n_items]; topk: topk_scores/topk_items [batch, K]; embedding: user_embedding.",
)
@click.option("--k", type=int, default=100, show_default=True, help="K for --head topk.")
@click.option(
    "--exclude-history",
    is_flag=True,
    help="Never rank items in the input window (the last max-seq-len items); for the full history or "
    "other items use the exclude_items input.",
)
@click.option(
    "--no-exclude-items",
    is_flag=True,
    help="Ranking heads without the exclude_items [batch, E] input (clients then send two inputs).",
)
@click.option(
    "--max-seq-len",
    type=int,
    default=None,
    help="Longest history the artifact accepts (default: the checkpoint's training length, else 50). "
    "May exceed the training length (no positional embeddings).",
)
@click.option(
    "--fp16", is_flag=True, help="Also write model.fp16.onnx (and build a TensorRT engine if possible)."
)
@click.option("--opset", type=int, default=None, help="ONNX opset (default 20; supported 19..23).")
@click.option(
    "--body",
    type=click.Choice(["chunked", "rowwise", "vectorized", "timeloop"]),
    default="chunked",
    show_default=True,
    help="SelectiveScan function body used by ONNX Runtime (see docs/onnx-export.md).",
)
@click.option(
    "--dataset",
    type=click.Path(path_type=Path),
    default=None,
    help="Interaction file the model was trained on; only needed for the item vocabulary of a RecBole "
    "checkpoint.",
)
@click.option(
    "--streaming",
    is_flag=True,
    help="Also write init.onnx and step.onnx (and .fp16 variants with --fp16): recurrent-state "
    "graphs for O(1) work per new event (docs/streaming.md).",
)
@click.option(
    "--fused",
    is_flag=True,
    help="One m4r::MambaMixer node per Mamba block (fused CPU kernel in libm4r_ort_ops.so; the node's "
    "function body runs it without the library); with --streaming, step.onnx gets one m4r::MambaMixerStep "
    "node per block likewise: docs/ort-custom-ops.md.",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write model.int8.onnx: weight GEMMs in int8 (ONNX Runtime dynamic quantization), the scan "
    "and its state fp32 (docs/ort-custom-ops.md).",
)
@click.option(
    "--topk-chunk",
    type=int,
    default=None,
    help="--head topk scores the catalogue this many items at a time and merges the partial top-Ks "
    "(exact; memory batch x chunk instead of batch x n_items). Default 65536.",
)
@click.option(
    "--native-topk/--no-native-topk",
    default=True,
    help="--head topk: the top-K is one m4r::ScoreTopK node (default), which libm4r_ort_ops.so runs as a "
    "one-pass native kernel and whose function body is the chunked subgraph (runs without the library); "
    "--no-native-topk writes the chunked subgraph as plain ops (docs/onnx-export.md).",
)
@click.option(
    "--external-data",
    is_flag=True,
    help="Write the weights to a side file MODEL.data (ONNX external data, listed and hashed in the "
    "manifest) whatever their size; it is always done above 256 MiB of fp32 weights.",
)
@click.option(
    "--ann",
    type=click.Choice(["pq", "ivf", "hnsw"]),
    default=None,
    help="--head embedding: also write item_index.faiss, an approximate nearest-neighbour index of the "
    "item table (faiss, inner product; parameters and sha256 in the manifest). pq (recommended): 4-bit "
    "product-quantisation scan of every item + exact re-ranking, good recall on any table; ivf: "
    "inverted lists, only for tables with cluster structure; hnsw: a graph, slow to build.",
)
@click.option(
    "--ann-k-factor",
    type=int,
    default=None,
    help="--ann pq: candidates re-ranked exactly per result (default 64; more = higher recall, slower). "
    "Stored in the manifest; verify, bench and Triton use it.",
)
@click.option(
    "--ann-pq-m",
    type=int,
    default=None,
    help="--ann pq: sub-quantisers, must divide the hidden size (default hidden / 2: 16 bytes an item "
    "at hidden 64).",
)
@click.option(
    "--ann-refine",
    type=click.Choice(["fp32", "fp16"]),
    default=None,
    help="--ann pq: precision of the table copy used for re-ranking (default fp32, exact scores; fp16 "
    "halves the index).",
)
@click.option(
    "--ann-nprobe",
    type=int,
    default=None,
    help="--ann ivf: inverted lists searched per query (default 64; more = higher recall, slower). "
    "Stored in the manifest; verify, bench and Triton use it.",
)
@click.option(
    "--ann-nlist", type=int, default=None, help="--ann ivf: inverted lists (default 4 sqrt(n_items))."
)
@click.option(
    "--ann-ef-search",
    type=int,
    default=None,
    help="--ann hnsw: search beam width (default 256; more = higher recall, slower). Stored in the manifest.",
)
@click.option("--ann-m", type=int, default=None, help="--ann hnsw: graph degree (default 32).")
@click.option(
    "--ann-ef-construction", type=int, default=None, help="--ann hnsw: build beam width (default 64)."
)
@click.option("--no-trt", is_flag=True, help="Do not try to build a TensorRT engine after --fp16.")
def export(
    ckpt: Path,
    out_dir: Path,
    head: str,
    k: int,
    exclude_history: bool,
    no_exclude_items: bool,
    max_seq_len: int | None,
    fp16: bool,
    opset: int | None,
    body: str,
    dataset: Path | None,
    streaming: bool,
    fused: bool,
    int8: bool,
    topk_chunk: int | None,
    native_topk: bool,
    external_data: bool,
    ann: str | None,
    ann_nprobe: int | None,
    ann_nlist: int | None,
    ann_ef_search: int | None,
    ann_m: int | None,
    ann_ef_construction: int | None,
    ann_k_factor: int | None,
    ann_pq_m: int | None,
    ann_refine: str | None,
    no_trt: bool,
) -> None:
    """Export a checkpoint to ONNX: one m4r::SelectiveScan node per layer with a portable function body.

    Writes DIR/model.onnx, DIR/model.fp16.onnx (--fp16), DIR/items.txt, DIR/item_embedding.npy
    (--head embedding), DIR/init.onnx + DIR/step.onnx (--streaming) and DIR/manifest.json, each
    atomically; the export measures ONNX Runtime
    against PyTorch and fails (writing nothing) when parity is outside the stated tolerance.
    """
    from ..checkpoint import read_checkpoint
    from ..fileio import ensure_writable_dir
    from .export import DEFAULT_OPSET, ExportOptions, export_artifacts

    ds = None
    if dataset is not None:
        from ..data import load_dataset

        ds = load_dataset(dataset)
    checkpoint = read_checkpoint(ckpt, ds)
    model = checkpoint.build_model()
    if max_seq_len is None:
        max_seq_len = int(checkpoint.meta.get("max_seq_len") or 50)
    opts = ExportOptions(
        head=head,
        k=k,
        exclude_history=exclude_history,
        exclude_items=not no_exclude_items,
        max_seq_len=max_seq_len,
        fp16=fp16,
        opset=DEFAULT_OPSET if opset is None else opset,
        body=body,
        streaming=streaming,
        fused=fused,
        int8=int8,
        external_data=external_data,
        native_topk=native_topk,
        ann=ann,
        ann_nprobe=ann_nprobe,
        ann_nlist=ann_nlist,
        ann_ef_search=ann_ef_search,
        ann_m=ann_m,
        ann_ef_construction=ann_ef_construction,
        ann_k_factor=ann_k_factor,
        ann_pq_m=ann_pq_m,
        ann_refine=ann_refine,
        **({} if topk_chunk is None else {"topk_chunk": topk_chunk}),
    )
    opts.validate(model.n_items, engine=fp16 and not no_trt, hidden=model.config.hidden_size)
    ensure_writable_dir(out_dir)  # fail fast, before the slow parts
    result = export_artifacts(
        model,
        out_dir,
        opts,
        checkpoint_path=ckpt,
        build_trt=not no_trt,
        echo=lambda m: click.echo(m, err=True),
    )
    m = result.manifest
    for name, info in m["files"].items():
        click.echo(f"wrote {result.out_dir / name} ({info['bytes']} bytes)")
    click.echo(f"wrote {result.out_dir / 'manifest.json'}")
    for precision, p in m["parity"].items():
        click.echo(
            f"parity {precision}: max abs diff {p['max_abs_diff']:.3g}, "
            f"top-10 overlap {p['top10_overlap']:.4f} "
            f"(tolerance atol {p['tolerance']['atol']}, rtol {p['tolerance']['rtol']})"
        )
    for precision, p in m.get("streaming", {}).get("parity", {}).items():
        click.echo(
            f"streaming parity {precision} (init + step vs full re-encode): max abs diff "
            f"{p['max_abs_diff']:.3g}, top-10 overlap {p['top10_overlap']:.4f}"
        )
    trt = m["tensorrt"]
    if trt["status"] == "built":
        click.echo(f"TensorRT: built {result.out_dir / str(trt['engine'])}")
    elif trt["status"] == "failed":
        raise M4RError(
            f"TensorRT engine build failed: {trt['reason']} (the ONNX files and manifest were written)"
        )
    else:
        click.echo(f"TensorRT: skipped: {trt['reason']}")


@click.command("build-ort-ops")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Build directory (default: ~/.cache/m4r/native-cpu/<sources hash>, where m4r finds the library).",
)
@click.option(
    "--onnxruntime-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    envvar="ONNXRUNTIME_ROOT",
    help="Folder with ONNX Runtime's include/onnxruntime_cxx_api.h: an ONNX Runtime release, or the "
    "output of scripts/fetch_ort_headers.sh (env: ONNXRUNTIME_ROOT).",
)
@click.option("--jobs", "-j", type=int, default=None, help="Parallel compile jobs (default: CPU count).")
@click.option("--verbose", "-v", is_flag=True, help="Echo CMake and compiler output.")
def build_ort_ops(out: Path | None, onnxruntime_root: Path | None, jobs: int | None, verbose: bool) -> None:
    """Build libm4r_ort_ops.so, the ONNX Runtime custom-op library (needs cmake, a C++17 compiler and
    ONNX Runtime's C/C++ headers; no CUDA)."""
    from .ort_ops import ORT_OPS_ENV
    from .ort_ops import build_ort_ops as build

    click.echo("building libm4r_ort_ops.so with CMake ...")
    lib = build(out, onnxruntime_root_dir=onnxruntime_root, jobs=jobs, echo=click.echo if verbose else None)
    click.echo(f"  libm4r_ort_ops.so: {lib}")
    found = "m4r finds it there" if out is None else f"set {ORT_OPS_ENV}={lib} or pass --ort-ops {lib}"
    click.echo(
        f"ONNX Runtime: SessionOptions.register_custom_ops_library({str(lib)!r}) ({found}); "
        'Triton: model_operations { op_library_filename: "' + str(lib) + '" }'
    )
