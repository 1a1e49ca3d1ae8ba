"""`megafox-to-hf --verify` catches one corrupted weight at the default tolerance (issue 17).

The fault is injected on the test side: a wrapper runs the real CLI with the safetensors writer
patched to add one realistic error (one weight off by about one standard deviation of its
tensor) to one element while exporting."""
import shutil

from tests.support.processes import run_python

WRAPPER = '''
import sys
from checkpoints_tools import safetensors_stream, to_hf

TARGET, DELTA = sys.argv[1], float(sys.argv[2])
write = safetensors_stream.StreamingSafetensorsWriter.add

def add(self, name, tensor):
    if name == TARGET:
        tensor = tensor.clone()
        tensor.view(-1)[5] += DELTA
    write(self, name, tensor)

safetensors_stream.StreamingSafetensorsWriter.add = add
sys.exit(to_hf.main(sys.argv[3:]))
'''


def _run_corrupting_export(tmp_path, target, delta, *args):
    script = tmp_path / "corrupting_to_hf.py"
    script.write_text(WRAPPER)
    return run_python(script, target, delta, *args, timeout=300)


def test_verify_fails_on_one_corrupted_weight_and_keeps_the_old_export(tiny_converted, tmp_path):
    out = tmp_path / "hf"
    shutil.copytree(tiny_converted["export"], out)  # an earlier, good export (the fixture verified it)
    before = (out / "model.safetensors").read_bytes()
    name = "model.layers.0.self_attn.q_proj.weight"  # init std 0.02
    proc = _run_corrupting_export(tmp_path, name, 0.02, "--checkpoint", tiny_converted["ckpt"], "--output", out,
                                  "--no-progress", "--verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "weights: 1 of 38 tensors differ" in proc.stdout and f"{name}: 1 element(s) differ" in proc.stdout
    # the logit comparison alone would have passed: one weight moves fox1-tiny's logits ~2e-4
    logit_line = next(l for l in proc.stdout.splitlines() if "max |logit" in l)
    assert logit_line.endswith("OK"), logit_line
    assert (out / "model.safetensors").read_bytes() == before  # a failed --verify publishes nothing
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("hf.")) == []


def test_verify_passes_on_a_clean_export_at_the_default_tolerance(tiny_converted):
    out = tiny_converted["export_stdout"]  # the fixture's `megafox-to-hf --verify`, default tolerance, bf16
    assert "weights: all 38 tensors equal the checkpoint's, bit for bit: OK" in out
    assert "(tolerance 1.0e-03): OK" in out
