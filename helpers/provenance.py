"""Memorisation, invisible watermarks and C2PA provenance: the measurements of section 10.2.

Three small toolkits, each independent of the others:

* **Memorisation.** Nearest-neighbour distances from samples to the training set, and the ratio
  of the nearest to the second-nearest distance. A sample that copies a training image has a
  ratio near 0; Gu et al. (2025) count a sample as memorised when the ratio is below 1/3
  (:data:`MEMORISED_BELOW`).
* **Invisible watermarks.** ``imwatermark``'s DWT-DCT embedder, called exactly as diffusers'
  ``StableDiffusionXLWatermarker`` calls it (with its 48-bit message, :data:`SDXL_BITS`), the
  attacks a watermark meets on the way (JPEG, rescaling, cropping, noise), bit accuracy and the
  binomial p-value a detector decides with.
* **C2PA.** A signing identity made at run time (a self-made CA and an ES256 leaf certificate;
  nothing stored), a manifest that says "created by a trained algorithm", reading it back, and
  editing the pixels of a signed PNG while keeping its manifest (the tampering a reader must catch).

Images for the watermark and C2PA functions are ``uint8`` arrays ``(H, W, 3)`` in RGB order, as
a PNG holds them; :func:`to_uint8` converts the course's ``[-1, 1]`` tensors. The heavy imports
(``cv2``, ``imwatermark``, ``c2pa``, ``cryptography``) happen inside the functions that need them.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Credentials",
    "MEMORISED_BELOW",
    "SDXL_BITS",
    "TRAINED_ALGORITHMIC_MEDIA",
    "WATERMARK_METHODS",
    "bit_accuracy",
    "crop",
    "decode_png",
    "embed_watermark",
    "extract_watermark",
    "gaussian_noise",
    "jpeg",
    "make_credentials",
    "nearest_neighbours",
    "nn_ratio",
    "png_bytes",
    "read_manifest",
    "replace_pixels",
    "rescale",
    "sign_png",
    "to_uint8",
    "watermark_capacity",
    "watermark_p_value",
]

# --- memorisation --------------------------------------------------------------------------------

MEMORISED_BELOW = 1 / 3  # nearest / second-nearest distance under which a sample counts as a copy (Gu et al.)


def nearest_neighbours(queries: torch.Tensor, reference: torch.Tensor, k: int = 2,
                       exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances ``(N, k)`` from each query to its ``k`` nearest reference images, and their indices.

    Images are compared pixel by pixel (flattened), in float64. ``exclude_self=True`` is for
    ``queries`` that *are* ``reference`` (same length, same order): image ``i`` is then not its own
    neighbour, which gives the leave-one-out distances of real data to the rest of it.
    """
    for name, x in (("queries", queries), ("reference", reference)):
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or len(x) == 0:
            raise ValueError(f"{name} must be a non-empty tensor of images (N, ...); got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if queries[0].numel() != reference[0].numel():
        raise ValueError(f"queries and reference must have images of the same size; got {tuple(queries.shape[1:])} "
                         f"and {tuple(reference.shape[1:])}")
    if exclude_self and len(queries) != len(reference):
        raise ValueError(f"exclude_self=True needs queries to be the reference itself; got {len(queries)} and "
                         f"{len(reference)} images")
    available = len(reference) - int(exclude_self)
    if not isinstance(k, int) or not 1 <= k <= available:
        raise ValueError(f"k must be an int in [1, {available}] (the reference images available); got {k!r}")
    q, r = queries.detach().cpu().double().flatten(1), reference.detach().cpu().double().flatten(1)
    dists, idx = [], []
    for start in range(0, len(q), 1024):  # (1024, M) distance blocks keep the memory small
        d = torch.cdist(q[start:start + 1024], r)  # (n, M)
        if exclude_self:
            rows = torch.arange(len(d))
            d[rows, rows + start] = float("inf")
        values, indices = d.topk(k, dim=1, largest=False)  # sorted, nearest first
        dists.append(values)
        idx.append(indices)
    return torch.cat(dists), torch.cat(idx)


def nn_ratio(queries: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Distance to the nearest reference image over distance to the second nearest, ``(N,)`` in ``[0, 1]``.

    0 for an exact copy of a reference image; near 1 for a sample that sits as far from its
    nearest neighbour as from the next, as a new image does. Scale-free, so one threshold
    (:data:`MEMORISED_BELOW`) serves datasets of any contrast.
    """
    d, _ = nearest_neighbours(queries, reference, k=2, exclude_self=exclude_self)
    return torch.where(d[:, 1] > 0, d[:, 0] / d[:, 1].clamp_min(1e-300), torch.zeros_like(d[:, 0]))


# --- invisible watermarks ------------------------------------------------------------------------

WATERMARK_METHODS = ("dwtDct", "dwtDctSvd")


def _sdxl_bits() -> tuple[int, ...]:
    # The constant diffusers' SDXL pipelines embed (itself copied from Stability AI's generative-models).
    from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS

    return tuple(int(b) for b in WATERMARK_BITS)


SDXL_BITS = _sdxl_bits()  # 48 bits


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Course images in ``[-1, 1]``, ``(3, H, W)`` or ``(N, 3, H, W)`` -> ``uint8`` RGB ``(H, W, 3)`` or ``(N, H, W, 3)``.

    Rounded as diffusers' ``image_processor.postprocess`` rounds before a PNG is written.
    """
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must be a tensor (3, H, W) or (N, 3, H, W) in [-1, 1]; got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    x = ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()  # (..., H, W, 3)


def _check_rgb(image, name: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a uint8 RGB array (H, W, 3); got {desc}")


def _embedder(method: str, bits, n_bits: int):
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd
    from imwatermark.maxDct import EmbedMaxDct

    if method not in WATERMARK_METHODS:
        raise ValueError(f"method must be one of {WATERMARK_METHODS} (rivaGan needs onnxruntime, which the course "
                         f"does not install); got {method!r}")
    cls = EmbedMaxDct if method == "dwtDct" else EmbedDwtDctSvd
    return cls(watermarks=list(bits), wmLen=n_bits)


def watermark_capacity(height: int, width: int) -> int:
    """How many 4x4 blocks of the Haar level-1 approximation carry bits: ``(H // 8) * (W // 8)``.

    Each block carries one bit, bit ``i`` in every block whose row-major index is ``i`` mod the
    message length, so a message needs at least one block per bit; the copies are voted on.
    """
    return ((height // 4 * 2) // 4) * ((width // 4 * 2) // 4)


def embed_watermark(image: np.ndarray, bits=SDXL_BITS, method: str = "dwtDct") -> np.ndarray:
    """``image`` (``uint8`` RGB) with ``bits`` hidden in its U (blue-difference) channel, as ``uint8`` RGB.

    What ``imwatermark.WatermarkEncoder().encode(bgr, method)`` does to an 8-bit BGR image, the
    way the library's README uses it. Both methods take the level-1 Haar approximation of U and
    put bit ``i`` into every 4x4 block whose row-major index is ``i`` mod the message length, by
    quantising one number per block with a step of 36 to a quarter (bit 0) or three quarters (bit
    1) of a step: ``"dwtDct"`` the block's largest-magnitude coefficient after its first (in
    version 0.2.0 no DCT is taken, whatever the name says), ``"dwtDctSvd"`` the largest singular
    value of the block's DCT. ``WatermarkEncoder`` refuses images under 256 x 256 pixels; this
    function calls the embedder directly, so that smaller images can be measured, and refuses
    only those with fewer blocks than bits. (diffusers' ``StableDiffusionXLWatermarker`` passes
    *float* pixel values; OpenCV then offsets the chroma by 0.5 instead of 128, and a decoder that
    reads the saved 8-bit file quantises other numbers: section 10.2 measures what that costs.)
    """
    _check_rgb(image)
    bits = [int(b) for b in bits]
    if not bits or any(b not in (0, 1) for b in bits):
        raise ValueError(f"bits must be a non-empty sequence of 0s and 1s; got {bits[:8]}...")
    capacity = watermark_capacity(*image.shape[:2])
    if capacity < len(bits):
        raise ValueError(f"image of {image.shape[0]}x{image.shape[1]} pixels has {capacity} blocks, fewer than the "
                         f"{len(bits)} bits: each bit needs a block")
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    return np.ascontiguousarray(_embedder(method, bits, len(bits)).encode(bgr)[:, :, ::-1])


def extract_watermark(image: np.ndarray, n_bits: int = len(SDXL_BITS), method: str = "dwtDct") -> np.ndarray:
    """The ``n_bits`` bits ``imwatermark``'s decoder reads from ``image`` (``uint8`` RGB), as ``int`` ``(n_bits,)``.

    Each bit is the majority over the blocks that carry it; a bit with no block reads 0.
    """
    _check_rgb(image)
    if not isinstance(n_bits, int) or isinstance(n_bits, bool) or n_bits < 1:
        raise ValueError(f"n_bits must be a positive int; got {n_bits!r}")
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    import warnings

    with warnings.catch_warnings():  # a bit with no block averages an empty list: NaN, read as 0
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(_embedder(method, [], n_bits).decode(bgr), dtype=int)


def bit_accuracy(recovered, bits=SDXL_BITS) -> float:
    """Fraction of ``recovered`` bits equal to ``bits`` (0.5 is what a coin would get)."""
    recovered, bits = np.asarray(recovered).astype(int).ravel(), np.asarray(bits).astype(int).ravel()
    if len(recovered) != len(bits) or len(bits) == 0:
        raise ValueError(f"recovered and bits must be non-empty and of the same length; got {len(recovered)} and {len(bits)}")
    return float((recovered == bits).mean())


def watermark_p_value(n_match: int, n_bits: int) -> float:
    """``P(X >= n_match)`` for ``X ~ Binomial(n_bits, 1/2)``: the chance an unmarked image matches this well.

    A detector declares "watermarked" when this tail probability is below its false-positive
    budget. It assumes an unmarked image reads as fair, independent coin flips, which the
    section checks on real photographs. Exact: ``sum_{j >= n_match} C(n_bits, j) / 2**n_bits``.
    """
    for name, v in (("n_match", n_match), ("n_bits", n_bits)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int; got {v!r}")
    if n_bits < 1 or not 0 <= n_match <= n_bits:
        raise ValueError(f"n_match must lie in [0, n_bits] with n_bits >= 1; got n_match={n_match}, n_bits={n_bits}")
    return sum(math.comb(int(n_bits), j) for j in range(int(n_match), int(n_bits) + 1)) / 2 ** int(n_bits)


# --- attacks: what happens to an image between the generator and the detector --------------------

def _pil(image: np.ndarray):
    from PIL import Image

    _check_rgb(image)
    return Image.fromarray(image)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` saved as JPEG at ``quality`` (Pillow's defaults: 4:2:0 chroma subsampling) and decoded."""
    if not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"quality must be an int in [1, 95]; got {quality!r}")
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="JPEG", quality=quality)
    return decode_png(buffer.getvalue())


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` resized by ``factor`` (bicubic) and back to its own size: a thumbnail blown up again."""
    from PIL import Image

    if not 0 < factor < 1:
        raise ValueError(f"factor must lie in (0, 1); got {factor!r}")
    h, w = image.shape[:2]
    small = _pil(image).resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def crop(image: np.ndarray, fraction: float) -> np.ndarray:
    """The centre ``fraction`` of ``image`` (of each side), resized back to its size (bicubic)."""
    from PIL import Image

    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1); got {fraction!r}")
    h, w = image.shape[:2]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.asarray(_pil(image).crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC))


def gaussian_noise(image: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    """``image`` plus Gaussian noise of standard deviation ``std`` (in 0..255 units), rounded and clipped."""
    _check_rgb(image)
    if not std > 0:
        raise ValueError(f"std must be positive; got {std!r}")
    noise = np.random.default_rng(seed).normal(0.0, std, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


# --- C2PA: signed provenance manifests -----------------------------------------------------------

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


@dataclass(frozen=True)
class Credentials:
    """A signing identity made at run time: PEM certificate chain (leaf, then CA), PKCS#8 key, CA certificate."""

    chain_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def signer(self):
        """A fresh ``c2pa.Signer`` (ES256) for these credentials, without a time-stamp authority."""
        import c2pa

        return c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg=b"es256", sign_cert=self.chain_pem,
                                                         private_key=self.key_pem, ta_url=None))


def make_credentials(organisation: str = "Diffusion course (self-made CA)") -> Credentials:
    """A self-made certificate authority and an ES256 leaf certificate it issues, new keys each call.

    The leaf has what C2PA asks of a signing certificate (not a CA, digitalSignature key usage, an
    extended key usage, key identifiers). No public trust list contains this CA, so a reader
    reports ``signingCredential.untrusted`` unless it is told to trust ``ca_pem``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)])

    def usage(**on):
        keys = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{k: on.get(k, False) for k in keys})

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("course CA")).issuer_name(name("course CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("course signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return Credentials(
        chain_pem=leaf.public_bytes(pem) + ca.public_bytes(pem),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        ca_pem=ca.public_bytes(pem),
    )


def png_bytes(image: np.ndarray) -> bytes:
    """``image`` (``uint8`` RGB) encoded as a PNG file, losslessly."""
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The pixels of an encoded image file (PNG, JPEG, ...) as ``uint8`` RGB ``(H, W, 3)``."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"data must be the bytes of an image file; got {type(data).__name__}")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def sign_png(png: bytes, credentials: Credentials, title: str = "generated.png",
             generator: str = "diffusion-course") -> bytes:
    """``png`` with an embedded, signed C2PA manifest: one ``c2pa.created`` action by a trained algorithm.

    The manifest binds a SHA-256 hash of the file's bytes (all but the manifest itself), so any
    later change to the pixels breaks it. No thumbnail is embedded (it would carry the image twice).
    """
    import c2pa

    if not isinstance(png, (bytes, bytearray)) or bytes(png[:8]) != b"\x89PNG\r\n\x1a\n":
        raise ValueError("png must be the bytes of a PNG file (see png_bytes)")
    manifest = {
        "claim_generator_info": [{"name": generator, "version": "1"}],
        "title": title,
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [
            {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA}]}}],
    }
    context = c2pa.Context(settings=c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    source, signed = io.BytesIO(bytes(png)), io.BytesIO()
    with c2pa.Builder(json.dumps(manifest), context=context) as builder:
        builder.sign(credentials.signer(), "image/png", source, signed)
    return signed.getvalue()


def read_manifest(data: bytes, trust_anchor_pem: bytes | None = None) -> dict | None:
    """What a C2PA reader reports about the file ``data`` (a dict), or ``None`` if it carries no manifest.

    Keys include ``validation_state`` (``"Invalid"``, ``"Valid"``: intact but from an unknown
    signer, or ``"Trusted"``: intact and issued by a trust anchor), ``validation_status`` (the
    failure codes), ``active_manifest`` and ``manifests``. ``trust_anchor_pem`` adds a CA
    certificate to the reader's trust list.
    """
    import c2pa

    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"data must be the bytes of an image file; got {type(data).__name__}")
    context = None
    if trust_anchor_pem is not None:
        anchors = trust_anchor_pem.decode() if isinstance(trust_anchor_pem, bytes) else str(trust_anchor_pem)
        context = c2pa.Context(settings=c2pa.Settings.from_dict({"trust": {"trust_anchors": anchors},
                                                                  "verify": {"verify_trust": True}}))
    try:
        with c2pa.Reader("image/png", io.BytesIO(bytes(data)), context=context) as reader:
            return json.loads(reader.json())
    except c2pa.C2paError as error:
        if "ManifestNotFound" in type(error).__name__ or "ManifestNotFound" in str(error):
            return None
        raise


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    # (type, whole chunk: length + type + payload + CRC) for each chunk after the signature.
    if bytes(data[:8]) != b"\x89PNG\r\n\x1a\n":
        raise ValueError("data must be the bytes of a PNG file")
    chunks, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        chunks.append((bytes(data[i + 4:i + 8]), bytes(data[i:i + 12 + length])))
        i += 12 + length
    return chunks


def replace_pixels(signed_png: bytes, image: np.ndarray) -> bytes:
    """``signed_png`` with its pixel data (the ``IDAT`` chunks) swapped for ``image``'s, every other chunk kept.

    What an editor that preserves metadata does: the C2PA manifest (chunk ``caBX``) survives
    byte for byte, but the hash it signed no longer matches the file.
    """
    old = _png_chunks(signed_png)
    width, height = struct.unpack(">II", old[0][1][8:16])  # the IHDR payload starts with width, height
    _check_rgb(image)
    if image.shape[:2] != (height, width):
        raise ValueError(f"image must have the signed image's size {height}x{width}; got {image.shape[:2]}")
    new_data = b"".join(chunk for kind, chunk in _png_chunks(png_bytes(image)) if kind == b"IDAT")
    out, placed = [signed_png[:8]], False
    for kind, chunk in old:
        if kind != b"IDAT":
            out.append(chunk)
        elif not placed:
            out.append(new_data)
            placed = True
    return b"".join(out)
