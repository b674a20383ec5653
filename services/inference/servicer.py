"""The llmasos.v1.Inference servicer: translates messages to Engine calls and exceptions to
status codes. No logic of its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from llmasos.drivers.loaders.progress import LoadCancelled
from llmasos.drivers.model.kv_pool import KVBudgetError
from llmasos.proto import common_pb2, inference_pb2, inference_pb2_grpc
from llmasos.services.inference.engine import Engine, ModelEntry, StepEntry
from llmasos.services.inference.load_stream import LoadStream
from llmasos.services.inference.parallel import ALL_HERE, Spread
from llmasos.services.inference.sampler import SamplingParams

SERVICE_NAME = "llmasos.v1.Inference"

# Exception -> status code; the first matching row wins (subclasses before their bases).
ERRORS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (KVBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LoadCancelled, grpc.StatusCode.CANCELLED),
    (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
    (KeyError, grpc.StatusCode.NOT_FOUND),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # includes UnsupportedArchitecture
]


@contextmanager
def translated(context: grpc.ServicerContext) -> Iterator[None]:
    try:
        yield
    except tuple(e for e, _ in ERRORS) as err:
        code = next(c for e, c in ERRORS if isinstance(err, e))
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        context.abort(code, str(message))


def model_info(e: ModelEntry) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        name=e.name, source=e.source, architecture=e.architecture, parameters=e.parameters,
        dtype=e.dtype, memory_bytes=e.memory_bytes, context_length=e.context_length,
        device=e.device, vocab_size=e.vocab_size, quant=e.quant, tp=e.tp, pp=e.pp)


def step_entry(m: inference_pb2.StepEntry) -> StepEntry:
    return StepEntry(
        seq_id=m.seq_id, token_ids=list(m.token_ids), start_pos=m.start_pos,
        block_table=list(m.block_table), sample=m.sample,
        params=SamplingParams.from_proto(m.sampling),
        generated_ids=list(m.generated_ids) if m.generated_ids else None, reset=m.reset)


def spread_of(request: inference_pb2.LoadModelRequest) -> Spread:
    """Where the kernel placed the model's tp/pp ranks (all here without a rank_address)."""
    if not request.rank_address:
        return ALL_HERE
    return Spread(request.rank_address, request.rendezvous_port, tuple(request.remote_ranks))


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], object]) -> object:
        with translated(context):
            return fn()
        return None  # unreachable: abort raises

    def LoadModel(self, request: inference_pb2.LoadModelRequest,  # noqa: N802
                  context: grpc.ServicerContext) -> common_pb2.ModelInfo:
        return self._call(context, lambda: model_info(self.engine.load(
            request.name, request.path, request.dtype, request.kv_budget_bytes,
            request.quant, request.tp, request.pp, threads=request.threads,
            spread=spread_of(request))))

    def LoadModelStream(self, request: inference_pb2.LoadModelRequest,  # noqa: N802
                        context: grpc.ServicerContext) -> Iterator[common_pb2.DeployEvent]:
        def load(**progress: object) -> common_pb2.ModelInfo:
            return model_info(self.engine.load(
                request.name, request.path, request.dtype, request.kv_budget_bytes,
                request.quant, request.tp, request.pp, threads=request.threads,
                spread=spread_of(request), **progress))
        with translated(context):   # a caller gone stops the load between two steps
            yield from LoadStream(load, cancelled=lambda: not context.is_active())

    def UnloadModel(self, request: inference_pb2.UnloadModelRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> inference_pb2.UnloadModelResponse:
        unload = self.engine.abandon if request.abandoned else self.engine.unload
        self._call(context, lambda: unload(request.name))
        return inference_pb2.UnloadModelResponse()

    def ListModels(self, request: inference_pb2.ListModelsRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[model_info(e) for e in self.engine.models()],
            quant_formats=self.engine.quant_formats(), default_quant=self.engine.default_quant,
            device=str(self.engine.device))

    def Tokenize(self, request: inference_pb2.TokenizeRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> inference_pb2.TokenizeResponse:
        def run() -> inference_pb2.TokenizeResponse:
            if request.WhichOneof("input") == "messages":
                messages = [{"role": m.role, "content": m.content}
                            for m in request.messages.messages]
                if not messages:
                    raise ValueError("messages: at least one message is required")
                ids = self.engine.tokenize(request.model, messages=messages)
            else:
                ids = self.engine.tokenize(request.model, text=request.text)
            info = next(e for e in self.engine.models() if e.name == request.model)
            return inference_pb2.TokenizeResponse(
                token_ids=ids, eos_token_ids=self.engine.eos_token_ids(request.model),
                context_length=info.context_length, vocab_size=info.vocab_size)
        return self._call(context, run)

    def Detokenize(self, request: inference_pb2.DetokenizeRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> inference_pb2.DetokenizeResponse:
        return self._call(context, lambda: inference_pb2.DetokenizeResponse(
            text=self.engine.detokenize(request.model, list(request.token_ids))))

    def Geometry(self, request: inference_pb2.GeometryRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> common_pb2.PoolGeometry:
        def run() -> common_pb2.PoolGeometry:
            g = self.engine.geometry(request.model)
            return common_pb2.PoolGeometry(
                model=request.model, num_blocks=g.num_blocks, block_size=g.block_size,
                block_bytes=g.block_bytes, num_layers=g.num_layers, kv_heads=g.kv_heads,
                head_dim=g.head_dim, dtype=g.dtype, device=g.device)
        return self._call(context, run)

    def Step(self, request: inference_pb2.StepRequest,  # noqa: N802
             context: grpc.ServicerContext) -> inference_pb2.StepResponse:
        def run() -> inference_pb2.StepResponse:
            entries = [step_entry(e) for e in request.entries]
            t0 = time.perf_counter()
            results = self.engine.step(request.model, entries)
            compute_ms = (time.perf_counter() - t0) * 1000
            return inference_pb2.StepResponse(compute_ms=compute_ms, results=[
                inference_pb2.StepResult(
                    seq_id=r.seq_id, token_id=r.token_id, logprob=r.logprob, sampled=r.sampled,
                    text=r.text, error=r.error,
                    finish_reason=common_pb2.EXIT_STOP if r.stopped
                    else common_pb2.EXIT_REASON_UNSPECIFIED)
                for r in results])
        return self._call(context, run)

    def CopyBlocks(self, request: inference_pb2.CopyBlocksRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> inference_pb2.CopyBlocksResponse:
        self._call(context, lambda: self.engine.copy_blocks(
            request.model, list(request.src), list(request.dst)))
        return inference_pb2.CopyBlocksResponse()

    def SwapOut(self, request: inference_pb2.SwapOutRequest,  # noqa: N802
                context: grpc.ServicerContext) -> inference_pb2.SwapOutResponse:
        return inference_pb2.SwapOutResponse(handle=self._call(
            context, lambda: self.engine.swap_out(request.model, list(request.blocks))))

    def SwapIn(self, request: inference_pb2.SwapInRequest,  # noqa: N802
               context: grpc.ServicerContext) -> inference_pb2.SwapInResponse:
        self._call(context, lambda: self.engine.swap_in(
            request.model, request.handle, list(request.blocks)))
        return inference_pb2.SwapInResponse()

    def Release(self, request: inference_pb2.ReleaseRequest,  # noqa: N802
                context: grpc.ServicerContext) -> inference_pb2.ReleaseResponse:
        self._call(context, lambda: self.engine.release(request.model, list(request.seq_ids),
                                                        list(request.swap_handles)))
        return inference_pb2.ReleaseResponse()


def add_to_server(engine: Engine, server: grpc.Server) -> list[str]:
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(engine), server)
    return [SERVICE_NAME]
