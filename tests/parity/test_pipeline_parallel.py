"""Pipeline parallelism against eager training on the whole batch: every element of the state_dict
after 3 SGD-with-momentum steps, on the built-in GPT and MLP and a Hugging Face Llama, at pp 2 and 4,
with data and tensor parallelism around the stages; the schedule tables; the static check."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import shardfx
from shardfx.driver import build_mesh, check_pipeline_programs, compile_step
from shardfx.errors import ShardfxError
from shardfx.graphs import collectives
from shardfx.graphs.phases import BACKWARD_PART, FORWARD_PART
from shardfx.graphs.pp_schedule import ScheduleError, alive_peak, gpipe, interleaved_1f1b, one_f_one_b
from shardfx.graphs.program import PHASES
from shardfx.models import GPT, MLP, GPTConfig
from tests.fixtures import gpt_batch, mlp_batch
from tests.parity_util import eager_norms, eager_train, shardfx_train

RTOL = 1e-4
STEPS = 3


def sgd(params):  # type: ignore[no-untyped-def]
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def gpt_loss(out, targets):  # type: ignore[no-untyped-def]
    return F.cross_entropy(out.flatten(0, 1), targets.flatten())


def gpt(layers: int = 4, tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=layers, d_model=32, n_head=2, seq_len=16, tie_weights=tie, bias=True))


def assert_pipeline_parity(model, batch, loss_fn, world_size, config, optimizer=sgd):  # type: ignore[no-untyped-def]
    ref_losses, ref_state = eager_train(model, batch, loss_fn, STEPS, optimizer)
    losses, state, engine = shardfx_train(model, batch, loss_fn, STEPS, world_size, config, optimizer)
    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=1e-6)
    assert list(state) == list(ref_state)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=RTOL, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    return engine


def assert_eval_matches(engine, model, batch) -> None:  # type: ignore[no-untyped-def]
    """engine.eval_step equals the eager model's loss in eval mode at the engine's weights."""
    eager = copy.deepcopy(model)
    eager.load_state_dict(engine.state_dict())
    eager.eval()
    with torch.no_grad():
        expected = gpt_loss(eager(batch[0]), batch[1])
    torch.testing.assert_close(engine.eval_step(*batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_gpt_tied_pp2(schedule: str) -> None:
    config = shardfx.Config(pp_size=2, pp_microbatches=4, pp_schedule=schedule)
    engine = assert_pipeline_parity(gpt(2), gpt_batch(8), gpt_loss, 2, config)
    tied = engine.runtime.program.notes["pipeline"]["tied"]
    assert tied == {"wte.weight": [0, 1]}  # the embedding, tied to the head, lives on both stages


@pytest.mark.parametrize("schedule", [pytest.param("gpipe", marks=pytest.mark.slow), "1f1b"])
def test_gpt_pp4(schedule: str) -> None:
    config = shardfx.Config(pp_size=4, pp_microbatches=4, pp_schedule=schedule)
    engine = assert_pipeline_parity(gpt(4, tie=False), gpt_batch(8), gpt_loss, 4, config)
    starts = engine.runtime.program.notes["pipeline"]["starts"]
    assert starts == ["", "blocks.1", "blocks.2", "blocks.3"]


@pytest.mark.slow
def test_gpt_tied_pp4_micro_batches_8() -> None:
    config = shardfx.Config(pp_size=4, pp_microbatches=8)
    assert_pipeline_parity(gpt(4), gpt_batch(8), gpt_loss, 4, config)


def test_mlp_pp2() -> None:
    torch.manual_seed(0)
    model = MLP(d_in=16, hidden=(32, 32, 32), d_out=8)
    config = shardfx.Config(pp_size=2, pp_microbatches=3)
    assert_pipeline_parity(model, mlp_batch(12), F.mse_loss, 2, config)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_dp2_pp2(zero_stage: int) -> None:
    config = shardfx.Config(pp_size=2, pp_microbatches=2, zero_stage=zero_stage)
    engine = assert_pipeline_parity(gpt(2), gpt_batch(8), gpt_loss, 4, config)
    mesh = engine.runtime.mesh
    assert mesh.names == ("pp", "dp") and mesh.coords(3) == {"pp": 1, "dp": 1}


def test_gradient_clipping_over_every_stage() -> None:
    """The norm is taken over both stages' gradients (the tied embedding's once) and clips as eager."""
    model, batch = gpt(2), gpt_batch(8)
    ref_losses, ref_state = eager_train(model, batch, gpt_loss, STEPS, sgd, grad_clip=0.5)
    config = shardfx.Config(pp_size=2, pp_microbatches=2, grad_clip=0.5)
    losses, state, engine = shardfx_train(model, batch, gpt_loss, STEPS, 2, config, sgd)
    torch.testing.assert_close(losses, ref_losses, rtol=RTOL, atol=1e-6)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=RTOL, atol=1e-6)
    norm = eager_norms(model, batch, gpt_loss, STEPS, 0.5, sgd)[-1]
    assert norm > 0.5  # the clip acted
    assert engine.last_grad_norm == pytest.approx(norm, rel=1e-5)


def test_a_new_batch_shape_keeps_the_stages() -> None:
    """The first compile's cut (here moved by a memory limit at batch 32) holds for a batch of 8,
    whose activations alone would let the cost model cut elsewhere: the ranks keep their stages."""
    model, big, small = gpt(8, tie=False), gpt_batch(32), gpt_batch(8)
    config = shardfx.Config(pp_size=2, pp_microbatches=4, pp_stage_memory=2_900_000, max_batch_shapes=2)
    engine = shardfx.compile_distributed(
        copy.deepcopy(model), 2, example_inputs=big, loss_fn=gpt_loss, optimizer=sgd, config=config
    )
    assert engine.runtime.program.notes["pipeline"]["starts"] == ["", "blocks.3"]
    losses = [engine.train_step(*big), engine.train_step(*small)]
    assert engine.runtime.program.notes["pipeline"]["starts"] == ["", "blocks.3"]
    eager = copy.deepcopy(model)
    opt = sgd(list(eager.parameters()))
    for (tokens, targets), loss in zip([big, small], losses):
        ref = gpt_loss(eager(tokens), targets)
        ref.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, ref.detach(), rtol=RTOL, atol=1e-6)
    state = engine.state_dict()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=1e-6)


def test_interleaved_checkpoint_with_sharded_optimizer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """dp2 x pp2 interleaved, ZeRO-1: each rank's two stages' momentum shards saved with their own
    specs; reloaded at the same layout and at pp1 the training continues as without the break."""
    model, batch = gpt(4), gpt_batch(8)
    options = dict(pp_size=2, pp_microbatches=2, pp_schedule="interleaved_1f1b", pp_chunks=2, zero_stage=1)

    def engine(world_size: int, **config):  # type: ignore[no-untyped-def]
        return shardfx.compile_distributed(
            copy.deepcopy(model), world_size, example_inputs=batch, loss_fn=gpt_loss, optimizer=sgd,
            config=shardfx.Config(**config),
        )  # fmt: skip

    first = engine(4, **options)
    for _ in range(2):
        first.train_step(*batch)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    first.train_step(*batch)
    expected = first.state_dict()
    for world_size, config in [(4, options), (1, {})]:
        second = engine(world_size, **config)
        second.load_checkpoint(str(tmp_path / "ckpt"))
        second.train_step(*batch)
        state = second.state_dict()
        for key in expected:
            torch.testing.assert_close(
                state[key], expected[key], rtol=RTOL, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
            )


def test_each_rank_holds_its_stages_parameters() -> None:
    model = gpt(4, tie=False)
    config = shardfx.Config(pp_size=4, pp_microbatches=4)
    engine = shardfx.compile_distributed(
        copy.deepcopy(model), 4, example_inputs=gpt_batch(8), loss_fn=gpt_loss, optimizer=sgd, config=config
    )
    total = sum(p.numel() * 4 for p in model.parameters())
    held = [engine.stats(r)["memory"]["params"] for r in range(4)]
    assert sum(held) == total  # every parameter on exactly one stage
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    for r in (1, 2):  # the middle stages hold one block each and nothing else
        assert held[r] == block


@pytest.mark.parametrize("tie", [False, True])
def test_interleaved_1f1b(tie: bool) -> None:
    """Two stages a rank: the model cut in 4, stage v on rank v % 2; the tied embedding's parts on
    ranks 0 and 1; eval_step through the 4 stages."""
    config = shardfx.Config(pp_size=2, pp_microbatches=4, pp_schedule="interleaved_1f1b", pp_chunks=2)
    model, batch = gpt(4, tie=tie), gpt_batch(8)
    engine = assert_pipeline_parity(model, batch, gpt_loss, 2, config)
    notes = engine.runtime.program.notes["pipeline"]
    assert notes["starts"] == ["", "blocks.1", "blocks.2", "blocks.3"] and notes["ranks"] == 2
    held = [set(engine.runtime.states[r].params) for r in range(2)]
    assert "blocks.0.attn.qkv.weight" in held[0] and "blocks.2.attn.qkv.weight" in held[0]  # stages 0 and 2
    assert "blocks.1.attn.qkv.weight" in held[1] and "blocks.3.attn.qkv.weight" in held[1]  # stages 1 and 3
    assert_eval_matches(engine, model, batch)


@pytest.mark.slow
def test_interleaved_dp2_zero3_and_llama() -> None:
    config = shardfx.Config(pp_size=2, pp_microbatches=4, pp_schedule="interleaved_1f1b", pp_chunks=2, zero_stage=3)
    assert_pipeline_parity(gpt(4), gpt_batch(8), gpt_loss, 4, config)
    hf, model = _llama()
    config = shardfx.Config(pp_size=2, pp_microbatches=2, pp_schedule="interleaved_1f1b", pp_chunks=2)
    assert_pipeline_parity(model, _hf_batch(hf), hf.lm_loss, 2, config)


def test_schedule_tables() -> None:
    for stages, micro in [(2, 4), (4, 4), (4, 8), (3, 2)]:
        for table in (gpipe(stages, micro), one_f_one_b(stages, micro)):
            for steps in table:
                assert sorted((s.micro_batch, s.part) for s in steps) == sorted(
                    (m, p) for m in range(micro) for p in (FORWARD_PART, BACKWARD_PART)
                )
                done = set()
                for s in steps:  # a backward comes after its forward, backwards in micro-batch order
                    if s.part == BACKWARD_PART:
                        assert s.micro_batch in done
                    done.add(s.micro_batch) if s.part == FORWARD_PART else None
        # 1F1B keeps at most P - s micro-batches alive on stage s; GPipe all M
        assert [alive_peak(s) for s in one_f_one_b(stages, micro)] == [min(stages - s, micro) for s in range(stages)]
        assert [alive_peak(s) for s in gpipe(stages, micro)] == [micro] * stages
    for ranks, micro, chunks in [(2, 4, 2), (4, 8, 2), (2, 6, 3)]:
        for steps in interleaved_1f1b(ranks, micro, chunks):
            units = [(s.chunk, s.micro_batch, s.part) for s in steps]
            assert sorted(units) == sorted(
                (c, m, p) for c in range(chunks) for m in range(micro) for p in (FORWARD_PART, BACKWARD_PART)
            )
            for c, m, p in units:  # a backward after its forward
                if p == BACKWARD_PART:
                    assert units.index((c, m, FORWARD_PART)) < units.index((c, m, p))


@pytest.mark.slow
def test_1f1b_keeps_fewer_micro_batches_alive_counted_by_the_runtime() -> None:
    """The micro-batches whose saved values the runtime holds at once (bytes: the next test)."""
    model, batch = gpt(4, tie=False), gpt_batch(8)
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        config = shardfx.Config(pp_size=4, pp_microbatches=8, pp_schedule=schedule)
        engine = shardfx.compile_distributed(
            copy.deepcopy(model), 4, example_inputs=batch, loss_fn=gpt_loss, optimizer=sgd, config=config
        )
        engine.train_step(*batch)
        peaks[schedule] = engine.runtime.peak_alive
    assert peaks["gpipe"] == [8, 8, 8, 8]
    assert peaks["1f1b"] == [4, 3, 2, 1]


def _compiled(world_size: int = 2, **options):  # type: ignore[no-untyped-def]
    config = shardfx.Config(pp_size=2, pp_microbatches=2, **options)
    mesh = build_mesh(config, world_size)
    return compile_step(gpt(2), gpt_batch(8), gpt_loss, config, mesh)


def test_static_check_refuses_a_removed_receive() -> None:
    compiled = _compiled()
    program = compiled.programs["stage1/last"]
    recv = next(n for n in program.graph.nodes if n.target is collectives.RECV)
    with program.graph.inserting_before(recv):
        zeros = program.graph.call_function(torch.ops.aten.zeros.default, (list(recv.meta["val"].shape),))
    zeros.meta = dict(recv.meta)
    recv.replace_all_uses_with(zeros)
    program.graph.erase_node(recv)
    program.recompile()
    program.notes.pop(PHASES)
    with pytest.raises(
        ScheduleError,
        match=r"(?s)rank 0 \(pp=0, dp=0\), step F1, node send.*rank 1 \(pp=1, dp=0\) runs F1 with no receive",
    ):
        check_pipeline_programs(compiled)


def test_static_check_refuses_a_changed_shape() -> None:
    compiled = _compiled()
    program = compiled.programs["stage1/middle"]
    recv = next(n for n in program.graph.nodes if n.target is collectives.RECV)
    shape = list(recv.args[0])
    shape[0] += 1
    recv.args = (shape, *recv.args[1:])
    program.notes.pop(PHASES)
    with pytest.raises(ScheduleError) as info:
        check_pipeline_programs(compiled)
    text = str(info.value)
    assert "rank 0" in text and "rank 1" in text and "disagree" in text and recv.name in text


def test_pipeline_program_shows_sends_and_receives() -> None:
    compiled = _compiled()
    from shardfx.graphs.format import format_program

    text = format_program(compiled.programs["stage0/last"])
    assert "shardfx.send" in text and "shardfx.recv" in text


def test_named_split() -> None:
    config = shardfx.Config(pp_size=2, pp_microbatches=2, pp_split=["blocks.3"])
    engine = assert_pipeline_parity(gpt(4, tie=False), gpt_batch(8), gpt_loss, 2, config)
    assert engine.runtime.program.notes["pipeline"]["starts"] == ["", "blocks.3"]


def test_bad_split_names_the_blocks() -> None:
    with pytest.raises(
        ShardfxError, match=r"no node of the forward comes from; blocks a stage may begin at: blocks.0, blocks.1"
    ):
        _compiled(pp_split=["blocks.7"])


def test_batch_norm_is_refused_naming_the_module() -> None:
    torch.manual_seed(0)
    model = MLP(d_in=16, hidden=(32, 32), d_out=8, batchnorm=True)
    config = shardfx.Config(pp_size=2, pp_microbatches=2)
    for world_size in (2, 4):  # at dp2 sync_batch_norm has made the statistics global: still per batch
        with pytest.raises(ShardfxError, match=r"norms.0 takes statistics over the batch"):
            shardfx.compile_distributed(
                model, world_size, example_inputs=mlp_batch(12), loss_fn=F.mse_loss, config=config
            )


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="pp_split names the modules that begin stages 1 .. 1: it needs 1 names"):
        shardfx.Config(pp_size=2, pp_split=["a", "b"])
    with pytest.raises(ValueError, match="grad_accum_steps must be 1"):
        shardfx.Config(pp_size=2, grad_accum_steps=2)
    with pytest.raises(ValueError, match="pp_schedule"):
        shardfx.Config(pp_size=2, pp_schedule="zigzag")
    with pytest.raises(ValueError, match="runs pp_chunks >= 2 stages a rank"):
        shardfx.Config(pp_size=2, pp_schedule="interleaved_1f1b")
    with pytest.raises(ValueError, match="in groups of pp_size=2; pp_microbatches=3"):
        shardfx.Config(pp_size=2, pp_microbatches=3, pp_schedule="interleaved_1f1b", pp_chunks=2)
    with pytest.raises(ValueError, match="pp_chunks=2 is for pp_schedule='interleaved_1f1b'"):
        shardfx.Config(pp_size=2, pp_chunks=2)
    with pytest.raises(ValueError, match="not a multiple of Config.tp_size x pp_size"):
        build_mesh(shardfx.Config(pp_size=4), 6)
    with pytest.raises(ValueError, match="1 data-parallel ranks x 4 pipeline micro-batches"):
        shardfx.compile_distributed(
            gpt(2),
            2,
            example_inputs=gpt_batch(6),
            loss_fn=gpt_loss,
            config=shardfx.Config(pp_size=2, pp_microbatches=4),
        )


def _llama(layers: int = 4):  # type: ignore[no-untyped-def]
    hf = pytest.importorskip("tests.hf_models")
    torch.manual_seed(0)
    config = hf.T.LlamaConfig(**{**hf.LLAMA, "num_hidden_layers": layers}, num_attention_heads=4, num_key_value_heads=4)
    return hf, hf.T.LlamaForCausalLM(config)


def _hf_batch(hf, rows: int = 8):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    return (
        torch.randint(0, hf.VOCAB, (rows, hf.SEQ), generator=g),
        torch.randint(0, hf.VOCAB, (rows, hf.SEQ), generator=g),
    )


def test_hf_llama_pp2() -> None:
    hf, model = _llama()
    config = shardfx.Config(pp_size=2, pp_microbatches=4)
    engine = assert_pipeline_parity(model, _hf_batch(hf), hf.lm_loss, 2, config)
    assert engine.runtime.program.notes["pipeline"]["starts"] == ["", "model.layers.2"]


def test_hf_gpt2_tied_pp2() -> None:
    hf = pytest.importorskip("tests.hf_models")
    config = shardfx.Config(pp_size=2, pp_microbatches=2, pp_schedule="gpipe")
    engine = assert_pipeline_parity(hf.build("gpt2"), _hf_batch(hf), hf.lm_loss, 2, config)
    assert engine.runtime.program.notes["pipeline"]["tied"] == {"transformer.wte.weight": [0, 1]}


def test_hf_llama_tp2_pp2() -> None:
    hf, model = _llama()
    config = shardfx.Config(pp_size=2, pp_microbatches=2, tp_size=2)
    engine = assert_pipeline_parity(model, _hf_batch(hf), hf.lm_loss, 4, config)
    assert engine.runtime.mesh.names == ("pp", "dp", "tp")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_hf_llama_pp4(schedule: str) -> None:
    hf, model = _llama()
    config = shardfx.Config(pp_size=4, pp_microbatches=4, pp_schedule=schedule)
    assert_pipeline_parity(model, _hf_batch(hf), hf.lm_loss, 4, config)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_hf_llama_dp2_tp2_pp2(zero_stage: int) -> None:
    hf, model = _llama()
    config = shardfx.Config(pp_size=2, pp_microbatches=2, tp_size=2, zero_stage=zero_stage)
    assert_pipeline_parity(model, _hf_batch(hf), hf.lm_loss, 8, config)


def test_checkpoint_across_pipeline_sizes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Saved at pp2 (dp2, ZeRO-1), loaded at pp1 and at pp4: the same training as without the break."""
    model, batch = gpt(4), gpt_batch(8)
    ref_losses, ref_state = eager_train(model, batch, gpt_loss, 4, sgd)

    def engine(world_size: int, **options):  # type: ignore[no-untyped-def]
        return shardfx.compile_distributed(
            copy.deepcopy(model), world_size, example_inputs=batch, loss_fn=gpt_loss, optimizer=sgd,
            config=shardfx.Config(**options),
        )  # fmt: skip

    first = engine(4, pp_size=2, pp_microbatches=2, zero_stage=1)
    losses = [first.train_step(*batch) for _ in range(2)]
    first.save_checkpoint(str(tmp_path / "ckpt"))
    for world_size, options in [(1, {}), (4, {"pp_size": 4, "pp_microbatches": 4})]:
        second = engine(world_size, **options)
        second.load_checkpoint(str(tmp_path / "ckpt"))
        later = [second.train_step(*batch) for _ in range(2)]
        torch.testing.assert_close(torch.stack(losses + later), ref_losses, rtol=RTOL, atol=1e-6)
        state = second.state_dict()
        for key in ref_state:
            torch.testing.assert_close(
                state[key], ref_state[key], rtol=RTOL, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
            )


def test_eval_step_matches_eager() -> None:
    model, batch = gpt(4), gpt_batch(8)
    config = shardfx.Config(pp_size=2, pp_microbatches=2, zero_stage=3)
    engine = shardfx.compile_distributed(
        copy.deepcopy(model), 4, example_inputs=batch, loss_fn=gpt_loss, optimizer=sgd, config=config
    )
    engine.train_step(*batch)
    assert_eval_matches(engine, model, batch)
    assert engine.eval_program().notes["pipeline"]["stage"] == 1


@pytest.mark.parametrize(
    "options",
    [
        {"recompute": "full"},
        {"zero_stage": 3, "bucket_mb": 1.0, "overlap": True},
        pytest.param({"zero_stage": 2, "tune_communication": True}, marks=pytest.mark.slow),
        {"zero_stage": 2, "grad_accum_sync": "micro_batch"},
    ],
    ids=["recompute", "zero3-bucket-overlap", "zero2-tuned", "zero2-reduce-every-micro-batch"],
)
def test_composes_inside_a_stage(options: dict) -> None:
    config = shardfx.Config(pp_size=2, pp_microbatches=2, **options)
    assert_pipeline_parity(gpt(4), gpt_batch(8), gpt_loss, 4, config)


def test_bf16_inside_stages() -> None:
    from tests.fixtures import BF16_LOSS_RTOL

    model, batch = gpt(4), gpt_batch(8)
    ref_losses, _ = eager_train(model, batch, gpt_loss, STEPS, sgd)
    config = shardfx.Config(pp_size=2, pp_microbatches=2, mixed_precision="bf16")
    losses, _, _ = shardfx_train(model, batch, gpt_loss, STEPS, 2, config, sgd)
    torch.testing.assert_close(losses, ref_losses, rtol=BF16_LOSS_RTOL, atol=0)


def test_saved_activations_measured_against_the_split() -> None:
    """What a stage keeps between a micro-batch's forward and backward: the bytes the split says,
    times the micro-batches the schedule keeps alive; recompute keeps less."""
    model, batch = gpt(4, tie=False), gpt_batch(8)
    kept = {}
    for schedule, recompute in [("gpipe", "none"), ("1f1b", "none"), ("1f1b", "full")]:
        config = shardfx.Config(pp_size=2, pp_microbatches=4, pp_schedule=schedule, recompute=recompute)
        engine = shardfx.compile_distributed(
            copy.deepcopy(model), 2, example_inputs=batch, loss_fn=gpt_loss, optimizer=sgd, config=config
        )
        engine.train_step(*batch)
        per_micro = engine.runtime.stages.program(0).notes[PHASES].saved_bytes
        measured = engine.runtime.states[0].saved_peak
        assert measured == per_micro * engine.runtime.peak_alive[0], (schedule, recompute)
        kept[schedule, recompute] = measured
    assert kept["1f1b", "none"] * 2 == kept["gpipe", "none"]  # stage 0: 2 of 4 micro-batches alive, not 4
    assert kept["1f1b", "full"] < kept["1f1b", "none"]


def test_deepspeed_config_with_pipeline_stages() -> None:
    """DeepSpeed's PipelineEngine: gradient_accumulation_steps is the micro-batches of a pipeline step."""
    ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}
    config = shardfx.Config.from_deepspeed(ds, world_size=4, pp_size=2)
    assert (config.pp_size, config.pp_microbatches, config.grad_accum_steps) == (2, 4, 1)
    engine = shardfx.compile_distributed(
        gpt(2), 4, example_inputs=gpt_batch(16), loss_fn=gpt_loss, optimizer=sgd, config=config
    )
    assert engine.runtime.mesh.names == ("pp", "dp")
    with pytest.raises(ValueError, match="train_batch_size=16 but .* x world size 4 = 32"):
        shardfx.Config.from_deepspeed(ds, world_size=8, pp_size=2)


def test_stage_memory_limit_moves_the_cut() -> None:
    """1F1B keeps 2 micro-batches alive on stage 0 of 2 and 1 on stage 1, so the time-balanced cut
    makes stage 0 the larger; a limit below its estimate moves a block to stage 1 (slower, within
    the limit); a limit no cut meets is an error."""

    def plan(limit):  # type: ignore[no-untyped-def]
        config = shardfx.Config(pp_size=2, pp_microbatches=4, pp_stage_memory=limit)
        compiled = compile_step(gpt(8, tie=False), gpt_batch(32), gpt_loss, config, build_mesh(config, 2))
        return compiled.programs["stage0/last"].notes["pipeline"]

    free = plan(None)
    assert free["starts"] == ["", "blocks.4"] and free["memory"][0] > free["memory"][1]
    limit = free["memory"][0] - 1
    bounded = plan(limit)
    assert bounded["starts"] == ["", "blocks.3"] and max(bounded["memory"]) <= limit
    assert max(bounded["seconds"]) > max(free["seconds"])  # balance traded for memory
    with pytest.raises(ShardfxError, match=r"no cut into 2 stages keeps every stage within Config.pp_stage_memory"):
        plan(1e5)


def test_pipeline_options_need_a_pipeline() -> None:
    with pytest.raises(ValueError, match=r"Config\(pp_microbatches=4\) configures a pipeline; it needs pp_size > 1"):
        shardfx.Config(pp_microbatches=4)
