"""The released weights in one call: a real HTTP server on 127.0.0.1 serves the authors'
.pth and a tampered copy; the cache then works without it; a .pth loads wherever a
checkpoint folder does."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

import minet_jax
from minet_jax import dehaze, evaluation, hub, image_io
from minet_jax.convert import torch_names
from minet_jax.core.params import flat_weights, weights_checksum


class _Server:
  """``http.server`` serving a folder on 127.0.0.1 from a thread."""

  def __init__(self, folder):
    server = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      def do_GET(self):
        server.requests += 1
        super().do_GET()

      def log_message(self, *args):
        pass

    self.requests = 0
    self.httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def url(self, name: str = "") -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

  def close(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join()


@pytest.fixture()
def server(shared_dir, tmp_path):
  """Serves ``model_ITS.pth`` (the shared copy of the release) and, under ``tampered/``,
  the same file with one weight's lowest byte changed."""
  root = tmp_path / "www"
  (root / "tampered").mkdir(parents=True)
  released = shared_dir / "weights" / "minet_its_official.pth"
  shutil.copy(released, root / "model_ITS.pth")
  data = bytearray(released.read_bytes())
  data[-1] ^= 1  # Legacy format: the last bytes are the last tensor's float32 data.
  (root / "tampered" / "model_ITS.pth").write_bytes(bytes(data))
  s = _Server(root)
  yield s
  s.close()


@pytest.fixture(scope="module")
def reference_weights(shared_dir):
  """The released weights from the shared numpy export, not through the .pth reader."""
  sd = dict(np.load(shared_dir / "weights" / "minet_its_official_state_dict.npz"))
  return torch_names.weights_from_torch_state_dict(sd, hub.convert.released_config())


def _assert_released(params, reference_weights):
  got, want = flat_weights(params.weights), flat_weights(reference_weights)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_pinned_weights_digest_is_that_of_the_released_weights(reference_weights):
  assert weights_checksum(reference_weights) == hub.RELEASES["its"].weights_sha256


def test_downloads_once_then_works_offline(server, tmp_path, reference_weights):
  cache = tmp_path / "cache"
  # A folder URL (as MINET_JAX_WEIGHTS_URL takes) names the file as released.
  params = minet_jax.pretrained("its", cache_dir=cache, url=server.url(), progress=False)
  _assert_released(params, reference_weights)
  assert params.config == hub.convert.released_config()
  assert sorted(p.name for p in cache.iterdir()) == ["model_ITS.pth"]  # no temporaries
  server.close()  # No network from here on.
  again = minet_jax.pretrained("its", cache_dir=cache, url=server.url("model_ITS.pth"),
                               progress=False)
  _assert_released(again, reference_weights)
  assert server.requests == 1


def test_a_tampered_download_is_refused_and_not_kept(server, tmp_path):
  cache = tmp_path / "cache"
  with pytest.raises(hub.DownloadError, match="SHA-256 mismatch"):
    minet_jax.pretrained(cache_dir=cache, url=server.url("tampered/model_ITS.pth"),
                         progress=False)
  assert not any(cache.iterdir())


def test_a_download_is_checked_before_it_is_put_in_the_cache(server, tmp_path, monkeypatch):
  """It was renamed into place, then checked: a stop during the check left an unchecked
  file in the cache."""
  cache = tmp_path / "cache"
  real = hub.verified
  seen = []

  def verified(path, name="its"):
    seen.append(os.path.exists(cache / "model_ITS.pth"))
    return real(path, name)

  monkeypatch.setattr(hub, "verified", verified)
  minet_jax.pretrained(cache_dir=cache, url=server.url("model_ITS.pth"), progress=False)
  assert seen == [False] and (cache / "model_ITS.pth").is_file()


def test_what_blocks_the_cached_file_and_odd_lengths(server, tmp_path):
  cache = tmp_path / "cache"
  (cache / "model_ITS.pth").mkdir(parents=True)
  with pytest.raises(hub.DownloadError, match="is in the way of the download"):
    minet_jax.pretrained(cache_dir=cache, url=server.url("model_ITS.pth"), progress=False)
  assert server.requests == 0
  # HTTP lets a server repeat an equal Content-Length; anything else is no length.
  assert hub._content_length("2570580") == hub._content_length("2570580, 2570580") == 2570580
  assert hub._content_length("1, 2") is hub._content_length("abc") is hub._content_length(
      None) is None


def test_a_damaged_cached_copy_is_refused_with_what_to_do(server, tmp_path):
  cache = tmp_path / "cache"
  cache.mkdir()
  shutil.copy(tmp_path / "www" / "tampered" / "model_ITS.pth", cache / "model_ITS.pth")
  with pytest.raises(hub.DownloadError, match="delete .*model_ITS.pth to download it again"):
    minet_jax.pretrained(cache_dir=cache, url=server.url("model_ITS.pth"), progress=False)
  assert server.requests == 0


def test_a_cache_folder_that_cannot_be_made_is_named(server, tmp_path, monkeypatch):
  (tmp_path / "a_file").write_text("")
  with pytest.raises(hub.DownloadError, match=r"cannot be kept in .*a_file/weights: .*; pass "
                     "a cache_dir that can be written"):
    minet_jax.pretrained(cache_dir=tmp_path / "a_file" / "weights",
                         url=server.url("model_ITS.pth"), progress=False)
  monkeypatch.setenv("MINET_JAX_CACHE", str(tmp_path / "a_file"))
  with pytest.raises(hub.DownloadError, match=r"cannot be kept in .*a_file/weights: .*; set "
                     "MINET_JAX_CACHE to a folder that can be written"):
    minet_jax.pretrained(url=server.url("model_ITS.pth"), progress=False)
  assert server.requests == 0


def test_the_file_digest_alone_accepts_the_pinned_file(server, tmp_path, monkeypatch):
  served = (tmp_path / "www" / "model_ITS.pth").read_bytes()
  release = hub.Release("model_ITS.pth", server.url("model_ITS.pth"),
                        hashlib.sha256(served).hexdigest(), "0" * 64, "test")
  monkeypatch.setitem(hub.RELEASES, "its", release)
  assert minet_jax.pretrained(cache_dir=tmp_path / "c", progress=False).num_params() == 628_078


def test_without_network_the_message_gives_the_manual_route(server, tmp_path):
  url = server.url("model_ITS.pth")
  server.close()
  cache = tmp_path / "cache"
  with pytest.raises(hub.DownloadError) as e:
    minet_jax.pretrained(cache_dir=cache, url=url, progress=False)
  message = str(e.value)
  assert "could not download" in message and hub.HOME_PAGE in message
  assert str(cache / "model_ITS.pth") in message and "\n" not in message
  assert not cache.exists() or not any(cache.iterdir())


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("MINET_JAX_CACHE", str(tmp_path / "elsewhere"))
  assert hub.download_dir() == tmp_path / "elsewhere" / "weights"
  monkeypatch.delenv("MINET_JAX_CACHE")
  assert hub.download_dir() == hub.files.cache_dir() / "weights"
  assert str(hub.download_dir()).endswith(".cache/minet_jax/weights")


def test_unknown_release_name():
  with pytest.raises(ValueError, match="unknown pretrained model 'xyz'; available: its"):
    minet_jax.pretrained("xyz")


def test_load_takes_a_pth_file(shared_dir, reference_weights):
  for name in ("minet_its_official.pth", "minet_its_official_zip.pth"):
    _assert_released(minet_jax.load(shared_dir / "weights" / name), reference_weights)


def test_load_of_a_file_that_is_no_checkpoint_says_so(tmp_path):
  path = tmp_path / "notes.pth"
  path.write_text("not a checkpoint")
  with pytest.raises(minet_jax.CheckpointError, match="notes.pth is not a usable MI-Net .pth"):
    minet_jax.load(path)


def _small_photo(shared_dir, folder):
  hazy = np.asarray(Image.open(shared_dir / "data/RESIDE/SOTS/indoor/hazy/1400_1.png"))
  folder.mkdir(parents=True)
  Image.fromarray(hazy[100:196, 200:328]).save(folder / "crop.png")
  return folder / "crop.png"


def _small_pair(shared_dir, root):
  """A 96x128 hazy/clear pair cut from SOTS 1400_1 where the parity crop is (its 640x480
  ground truth has a 10 px border around the 620x460 hazy image)."""
  _small_photo(shared_dir, root / "hazy")
  gt = np.asarray(Image.open(shared_dir / "data/RESIDE/SOTS/indoor/gt/1400.png"))
  (root / "gt").mkdir()
  Image.fromarray(gt[110:206, 210:338]).save(root / "gt" / "crop.png")
  return root


def test_dehaze_cli_fetches_its_by_default(server, shared_dir, tmp_path, monkeypatch, capsys,
                                           released_params):
  monkeypatch.setenv("MINET_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv(hub.URL_ENV, server.url())
  photo = _small_photo(shared_dir, tmp_path / "in")
  assert dehaze.main([str(photo), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
  assert (tmp_path / "cache" / "weights" / "model_ITS.pth").is_file()
  got = np.asarray(Image.open(tmp_path / "out" / "crop_dehazed.png"))
  want = np.asarray(minet_jax.apply(released_params, image_io.read_rgb(photo)))
  np.testing.assert_array_equal(got, np.round(want * 255).astype(np.uint8))


def test_dehaze_and_evaluate_take_a_pth(shared_dir, tmp_path, capsys):
  pth = shared_dir / "weights" / "minet_its_official.pth"
  photo = _small_photo(shared_dir, tmp_path / "in")
  assert dehaze.main(["--ckpt", str(pth), str(photo), "-o", str(tmp_path / "out"),
                      "--no-progress"]) == 0
  report = evaluation.evaluate(pth, _small_pair(shared_dir, tmp_path / "pair"),
                               methods=["minet", "hazy"], progress=False)
  minet, hazy = (r.psnr for r in report.rows)
  assert minet > hazy + 10


def test_evaluate_takes_a_release_name(server, shared_dir, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("MINET_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv(hub.URL_ENV, server.url())
  rc = evaluation.main(["--ckpt", "its", "--data", str(_small_pair(shared_dir, tmp_path / "p")),
                        "--methods", "minet", "--no-progress"])
  assert rc == 0 and "MI-Net" in capsys.readouterr().out


def test_an_oversized_download_is_cut_off(server, tmp_path, monkeypatch):
  monkeypatch.setattr(hub, "MAX_DOWNLOAD_BYTES", 100_000)
  cache = tmp_path / "cache"
  with pytest.raises(hub.DownloadError) as e:
    minet_jax.pretrained(cache_dir=cache, url=server.url("model_ITS.pth"), progress=False)
  assert "sent more than 100,000 bytes" in str(e.value)
  assert "Without network" not in str(e.value)
  assert not any(cache.iterdir())


@pytest.mark.parametrize("body", ["sized", "chunked"])
def test_a_connection_dropped_mid_download_is_a_download_error(tmp_path, body):
  # The server promises 100,000 bytes and hangs up after 10: a failed download (not a
  # damaged release), with nothing kept. (A chunked body cut short raises http.client's
  # IncompleteRead instead, no OSError; it is caught the same way.)
  class Truncating(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      self.send_response(200)
      if body == "sized":
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"0123456789")
      else:  # One whole chunk, then one cut short.
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"a\r\n0123456789\r\nff\r\n0123")
      self.close_connection = True

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  cache = tmp_path / "cache"
  try:
    reason = ("the connection closed after 10 of 100,000 bytes" if body == "sized" else
              "IncompleteRead")
    with pytest.raises(hub.DownloadError, match=f"could not download .*{reason}.*Without network"):
      minet_jax.pretrained(cache_dir=cache, progress=False,
                           url=f"http://127.0.0.1:{httpd.server_address[1]}/model_ITS.pth")
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join()
  assert not any(cache.iterdir())
