from conftest import run_cli


def test_main_job_embedded_default(tmp_path):
    proc = run_cli("medjax.main", f"--workdir={tmp_path}")
    assert "OK: every output within" in proc.stdout
    assert (tmp_path / "tiny_dinov2" / "params.safetensors").exists()
    assert (tmp_path / "embeddings.npz").exists()
