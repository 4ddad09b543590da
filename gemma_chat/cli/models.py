"""``gemma pull``, ``list``, ``show``, ``rm`` and ``models``: models on disk and in the
catalogue."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import click
import typer

from ..errors import ModelNotFound
from .common import BackendOpt, app, dim, pull_policy, stderr

QuantOpt = Annotated[str, typer.Option("--quant", "-q", help="q4, q5, q8, f16, bf16, f32, or a "
                                        "llama.cpp type (q4_k_m, q6_k, ...).")]


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="A catalogue name or alias (`gemma models`).")],
    backend: BackendOpt = "auto",
    quant: QuantOpt = "q4",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Download a model's weights for the backend (into the Hugging Face cache)."""
    from .. import loader
    from ..backends import formats_for
    from ..quant import parse

    fmt = formats_for(backend)[0]
    parse(quant, fmt if fmt == "mlx" else "gguf")
    resolved = loader.pull(model, fmt, quant, pull_policy(yes=True, quiet=quiet))
    stderr().print(f"{resolved.name}: {resolved.path}", markup=False)


@app.command("list")
def list_models() -> None:
    """The models on disk: name, format, quantization, size, path."""
    from rich.console import Console
    from rich.table import Table

    from ..inventory import local_models
    from ..memory import human

    table = Table(title="Models on disk", title_justify="left")
    for col in ("name", "format", "quantization", "size", "where", "path"):
        table.add_column(col)
    for m in local_models():
        table.add_row(m.name, m.format, m.quantization, human(m.size), m.origin, str(m.path))
    Console().print(table)


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="Catalogue name or alias, or a path.")],
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Context size for the memory "
                                     "estimate.")] = 8192,
) -> None:
    """Architecture, context, parameters, quantization, files, license, memory needs."""
    from .. import catalog, memory, prompt
    from ..gguf_file import read_gguf
    from ..resolve import resolve

    spec = catalog.load().get(model)
    lines = []
    local = None
    try:
        local = resolve(model, ("gguf", "mlx"))
    except ModelNotFound:
        if spec is None:
            raise
    if spec is None and local is not None:
        spec = local.spec
    arch = spec.arch if spec is not None else None
    template = ""
    if spec is not None:
        size = f"{spec.params_b:.2f}B parameters"
        if spec.params_effective_b:
            size += f", {spec.params_effective_b}B effective (without per-layer embeddings)"
        if spec.params_active_b:
            size += f", {spec.params_active_b}B active per token"
        lines += [f"model          {spec.name} ({spec.display}), {size}, "
                  f"{'instruction-tuned' if spec.instruction_tuned else 'pretrained'}",
                  f"input          {', '.join(spec.modalities)}" + (
                      " (beyond text: with its mmproj file on llama.cpp, its encoder "
                      "weights on MLX)"
                      if len(spec.modalities) > 1 else ""),
                  f"architecture   {spec.arch}, {spec.shape.get('layers')} layers, "
                  f"{spec.shape.get('heads')} heads / {spec.shape.get('kv_heads')} KV heads",
                  f"context        {spec.context:,} tokens",
                  f"license        {spec.license} (https://huggingface.co/{spec.hf_repo})",
                  "sources        GGUF: " + ", ".join(f"{k} {v.repo}/{v.file}"
                                                      for k, v in spec.gguf.items())]
    if local is not None:
        lines.append(f"on disk        {local.path} ({local.format}, {local.origin})")
        if local.format == "gguf":
            info = read_gguf(local.path)
            arch = info.architecture  # the file decides its format, not the name
            template = str(info.metadata.get("tokenizer.chat_template") or "")
            lines.append(f"quantization   {info.quantization}, {info.n_params / 1e6:,.0f}M "
                         f"parameters in the file")
            shape, shape_arch = memory.shape_from_gguf(info)
            est = memory.estimate(shape, shape_arch, info.file_size, ctx)
            from ..backends.mtmd import describe_projector
            from ..resolve import find_projector

            projector = find_projector(local.path)
            extra = projector.stat().st_size if projector is not None else 0
            lines.append(f"memory         about {memory.human(est.total + extra)} at context "
                         f"{ctx} (weights {memory.human(est.weights)}, KV cache "
                         f"{memory.human(est.kv_cache)}"
                         + (f", projector {memory.human(extra)})" if extra else ")"))
            if projector is not None:
                lines.append(f"projector      {projector.name}: takes "
                             f"{describe_projector(projector)}")
            repacking = repack_summary()
            if repacking:
                lines.append(f"repacking      {repacking}")
        elif local.format == "mlx":
            from ..backends.mlx_vision import describe_encoders

            lines.append(mlx_memory_line(local.path, ctx))
            takes = describe_encoders(local.path)
            if takes:
                lines.append(f"encoders       takes {takes}")
    else:
        lines.append("on disk        no (`gemma pull` downloads it)")
    if arch is not None:
        fmt = prompt.format_for(arch, template)
        lines.append("chat template  built in for its architecture (a model file's own "
                     "template is only rendered in a sandbox, to recognise its revision): " +
                     fmt.description)
        if getattr(fmt, "note", ""):
            lines.append(f"               {fmt.note}")
        if fmt.thought_channel:
            lines.append("thinking       yes: off by default; --think or /think on")
    typer.echo("\n".join(lines))


def mlx_memory_line(folder, ctx: int) -> str:
    """The memory an MLX model folder needs at ``ctx`` tokens: its weights and the KV cache
    mlx-lm fills (16-bit, the sliding-window layers their window plus the backend's slack)."""
    import json
    from pathlib import Path

    from .. import memory

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shape, arch = memory.shape_from_config(config)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    kv = memory.mlx_kv_cache_bytes(shape, arch, ctx, memory.MLX_SWA_SLACK)
    return (f"memory         about {memory.human(weights + kv)} at context {ctx} (weights "
            f"{memory.human(weights)}, KV cache {memory.human(kv)} in 16-bit; MLX)")


def repack_summary() -> str:
    """llama.cpp's weight repacking on this machine, where llama-cpp-python is installed."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return ""
    from ..backends import repack

    state = repack.prepare()
    if state.note:
        dim(state.note)
    return state.describe()


@app.command()
def rm(
    model: Annotated[str, typer.Argument(help="A catalogue name or alias.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete a model's files from the store and the Hugging Face cache."""
    from .. import catalog
    from ..inventory import local_models, remove
    from ..memory import human

    spec = catalog.get(model)
    targets = [m for m in local_models() if m.name == spec.name]
    if not targets:
        raise ModelNotFound(f"{spec.name} is not on disk")
    for m in targets:
        typer.echo(f"{m.path} ({m.format}, {m.origin}, {human(m.size)})", err=True)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("pass --yes to delete without asking")
        if not typer.confirm("Delete these files?", err=True):
            return
    remove(spec.name, targets)
    typer.echo(f"removed {spec.name}", err=True)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print the catalogue as JSON.")] = False,
) -> None:
    """List the Gemma models in the catalogue, and which are on disk."""
    from .. import catalog
    from ..resolve import on_disk

    specs = catalog.load().specs
    rows = [(spec, on_disk(spec)) for spec in specs]
    if as_json:
        typer.echo(json.dumps([{**spec.to_dict(), "on_disk": disk} for spec, disk in rows],
                              indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Gemma models", title_justify="left")
    for col, kw in (("name", {"style": "bold"}), ("aliases", {}), ("params", {"justify": "right"}),
                    ("context", {"justify": "right"}), ("type", {}), ("weights", {}),
                    ("on disk", {})):
        table.add_column(col, **kw)
    for spec, disk in rows:
        weights = [b for b, has in (("gguf", spec.gguf), ("mlx", spec.mlx)) if has]
        table.add_row(spec.name, ", ".join(spec.aliases), spec.params, f"{spec.context:,}",
                      spec.tuned.upper(), ", ".join(weights), ", ".join(disk) or "-")
    Console().print(table)
