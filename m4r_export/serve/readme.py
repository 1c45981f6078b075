"""The README.md written into every generated repository: how to serve exactly these files."""

from __future__ import annotations

from typing import Any

NGC_IMAGE = "nvcr.io/nvidia/tritonserver:25.01-py3"


def repository_readme(name: str, opts: Any, manifest: dict[str, Any], models: list[str]) -> str:
    L = int(manifest["max_seq_len"])
    inputs = ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in manifest["inputs"])
    outputs = ", ".join(f"`{o['name']}` {o['dtype']} {o['shape']}" for o in manifest["outputs"])
    lines = [
        f"# Triton model repository `{name}` (written by `m4r triton`)",
        "",
        f"Backend: **{opts.backend}**; models: {', '.join(f'`{m}`' for m in models)}.",
        f"Export: head `{manifest.get('head')}`, max_seq_len {L}; ONNX inputs {inputs}; outputs {outputs}.",
        "",
        "## Request format",
        f"* `{manifest['inputs'][0]['name']}`: int64 `[batch, {L}]`, item indices oldest first, "
        "right-padded with 0. "
        f"Histories longer than {L} must be cut to the most recent {L} items by the client; Triton rejects "
        "any other width (the fixed width is what lets the dynamic batcher batch requests).",
        f"* `{manifest['inputs'][1]['name']}`: int64 `[batch, 1]` (reshaped to `[batch]`), "
        f"clamped to `[1, {L}]`: "
        "an empty history (0) is read as length 1.",
        "* item ids outside `[0, n_items)` are treated as padding (0), exactly like the exported graph.",
    ]
    for spec in manifest["inputs"][2:]:
        how = "optional (zeros when absent)" if opts.backend == "python" else "required (send zeros for none)"
        lines.append(f"* `{spec['name']}`: {spec['dtype']} `{spec['shape']}`, 0 = none; {how}.")
    if opts.with_tokens:
        lines += [
            f"* `{name}_tokens` (ensemble): BYTES `history` `[1, n]` of raw item tokens "
            "(one user per request); "
            "unknown tokens are skipped and counted in `unknown_tokens`; the most recent "
            f"{L} known items are kept; an empty history or one with no known token is an error. "
            "Returns `item_tokens` (BYTES) plus the model's other outputs.",
        ]
        lines += [
            f"* optional BYTES `{spec['name']}_tokens` `[1, m]`: tokens for `{spec['name']}` "
            "(unknown ones dropped)."
            for spec in manifest["inputs"][2:]
        ]
    if opts.ann:
        lines += [
            f"* `exclude_items` int64 `[batch, m]`, optional, 0 = none: items never returned (at most "
            f"{opts.max_exclude} distinct per row).",
            "",
            f"`{name}` returns `topk_scores` float `[batch, {opts.k}]` and `topk_items` int64 "
            f"`[batch, {opts.k}]`, best first: the user vector of `model.onnx` searched in "
            f"`item_index.faiss` ({manifest['ann'].get('kind')}, parameters in `{name}/1/manifest.json`). "
            "APPROXIMATE: `m4r verify` on the export reports its recall@K against exact top-K. Excluded "
            "items: the index is asked for K + m neighbours (m = the row's distinct excluded items), the "
            "excluded ones dropped. Unfilled entries: score -inf, item 0. The model imports "
            "`m4r_export` and `faiss` (install m4r-export in the server's Python).",
        ]
    lines += ["", "## Start a server (from inside this directory)", ""]
    if opts.backend == "tensorrt":
        lines += [
            "The engine only runs on the GPU model and TensorRT version it was built with (see the engine's "
            "manifest). The `m4r::SelectiveScan` plugin must be registered before the engine loads; either:",
            "",
            "```bash",
            f"docker run --gpus all --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD:/repo {NGC_IMAGE} \\",
            "  env LD_PRELOAD=/repo/plugins/libm4r_trt_plugin_static.so \\",
            "  tritonserver --model-repository=/repo",
            "# or let the TensorRT backend load it:",
            "#   tritonserver --model-repository=/repo \\",
            "#     --backend-config=tensorrt,plugins=/repo/plugins/libm4r_trt_plugin_static.so",
            "```",
        ]
    else:
        run = "tritonserver --model-repository=/repo"
        prefix = ""
        if opts.backend == "python" or opts.with_tokens:
            prefix = (
                "pip install onnxruntime numpy && " if opts.backend == "python" else "pip install numpy && "
            )
            lines.append(
                "The Python-backend models need numpy (and onnxruntime for the model) in the server's Python."
            )
        if opts.backend == "python":
            lines += [
                "",
                "Without Docker, on a CPU host (tritonserver bundled in nvidia-pytriton, 127.0.0.1 only):",
                "",
                "```bash",
                'pip install "m4r-export[triton]" "numpy<2"',
                'pip install --no-deps "nvidia-pytriton==0.7.0"',
                "m4r serve .        # prints the URLs and a curl example; Ctrl-C stops it",
                "```",
                "",
                "Or the NGC container:",
            ]
        lines += [
            "",
            "```bash",
            f"docker run --rm {'--gpus all ' if opts.device_kind == 'gpu' else ''}-p8000:8000 -p8001:8001 "
            f"-p8002:8002 -v $PWD:/repo {NGC_IMAGE} \\",
            f"  bash -c '{prefix}{run}'",
            "```",
        ]
        if opts.ort_ops is not None:
            lines.append(
                f"The native custom-op library `ortops/{opts.ort_ops.name}` is named in "
                f"`{name}/config.pbtxt` "
                "(`model_operations`); it must match the server's ONNX Runtime version."
            )
    lines += [
        "",
        "## Check it",
        "",
        "```bash",
        "curl -s localhost:8000/v2/health/ready && echo ready",
        f"curl -s localhost:8000/v2/models/{name}/config | head -c 400",
        f"perf_analyzer -m {name} -u localhost:8001 -i grpc --concurrency-range 1:16:4 "
        + " ".join(
            f"--shape {spec['name']}:{L if n == 0 else 1}" for n, spec in enumerate(manifest["inputs"])
        ),
        "```",
        "",
        "perf_analyzer sends random data: random ids are valid input (out-of-range ids count as padding).",
    ]
    return "\n".join(lines) + "\n"
