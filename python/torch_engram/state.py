"""Decode state of Engram layers: what incremental decoding must carry between steps so that k new
tokens give exactly what the full forward gives at those positions (docs/SPEC.md section 11).

Per sequence of the batch:
- the n-gram history: the last N - 1 input ids and how many of them belong to the current document
  (fewer after a sequence start, a reset or a document start). It is shared by every Engram layer
  of a model: one hash per step serves them all (`EngramState.hash`).
- per Engram layer with a short conv, the conv's history: the last (kernel_size - 1) * dilation
  conv inputs U per branch (zeros before the sequence start).

Why raw ids and U rather than compressed ids and normalised vectors: the step then runs the very
kernels of the full forward on a short window (history + new tokens), and the result is bit for bit
the full forward's. The hash kernel compresses ids itself, and the conv kernel folds the RMSNorm
into its taps without ever storing normalised rows (a zero U normalises to exactly zero, which is
what the causal conv reads before position 0). The price is small: the window re-normalises
(kernel_size - 1) * dilation rows per step.
"""

from __future__ import annotations

import torch

from .config import EngramConfig

# CPU GEMMs round the rows of a tail block (rows mod 4 here, with MKL/oneDNN) differently from
# full blocks, so a one-token step would not reproduce the projection rows of the full forward.
# A step pads its projection input to a multiple of this many rows (the extra rows cost almost
# nothing: a decode GEMM is bound by reading the weight).
_ROW_BLOCK = 8


def linear_rows(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """linear(x) whose rows equal those of the same layer applied to a longer sequence (see
    _ROW_BLOCK): x [..., d_in] is padded with zero rows to a multiple of _ROW_BLOCK rows."""
    lead, d = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, d)
    n = flat.shape[0]
    pad = -n % _ROW_BLOCK
    if x.device.type == "cpu" and pad:
        flat = torch.cat([flat, flat.new_zeros(pad, d)])
    return linear(flat)[:n].reshape(*lead, -1)


class EngramState:
    """Decode state of a batch of B sequences for the Engram layers of one config.

    hash(hasher, input_ids [B, k]) returns the row ids [L, B, k, H] of the new tokens and advances
    the n-gram history; Engram(..., rows=..., state=self) then advances its conv history. With one
    Engram layer that owns a hasher, Engram(hidden, input_ids=..., state=self) does both.

    lengths [B] (optional, in hash and in Engram.forward): the number of valid new tokens of each
    sequence when the batch is right-padded to k; the state advances by lengths[b] and the outputs
    at padded positions are meaningless. Padding ids must still be valid ids (e.g. the pad id).
    """

    def __init__(self, config: EngramConfig, batch_size: int, device=None):
        if batch_size < 1:
            raise ValueError(f"EngramState: batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.batch_size = batch_size
        self.history = config.max_ngram_size - 1  # ids an n-gram looks back
        self.conv_window = (config.kernel_size - 1) * config.dilation if config.use_conv else 0
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.ids = torch.zeros(batch_size, self.history, dtype=torch.int64, device=self.device)
        # Ids of the current document in the history (the newest ones): 0..N-1.
        self.filled = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.conv: dict[int, torch.Tensor] = {}  # layer_id -> U history [B, W, M, D]

    # ---- per-sequence control ---------------------------------------------------------------
    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Start sequences anew (all, or those where mask [B] is True): empty n-gram history and
        zero conv history."""
        if mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        mask = self._check_batch(mask, "mask").to(torch.bool)
        self.filled.masked_fill_(mask, 0)
        for hist in self.conv.values():
            hist.masked_fill_(mask.to(hist.device).view(-1, 1, 1, 1), 0)

    def _check_batch(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if t.dim() != 1 or t.shape[0] != self.batch_size:
            raise ValueError(f"EngramState: {name} must be [{self.batch_size}], got {tuple(t.shape)}")
        return t.to(self.device)

    def _lengths(self, lengths: torch.Tensor | None, k: int) -> torch.Tensor:
        if lengths is None:
            return torch.full((self.batch_size,), k, dtype=torch.int64, device=self.device)
        lengths = self._check_batch(torch.as_tensor(lengths), "lengths").to(torch.int64)
        if bool(((lengths < 0) | (lengths > k)).any()):
            raise ValueError(f"EngramState: lengths must lie in [0, {k}] (the new tokens), got {lengths.tolist()}")
        return lengths

    @staticmethod
    def _advance(window: torch.Tensor, lengths: torch.Tensor, keep: int) -> torch.Tensor:
        """The last `keep` entries of each row of window [B, keep + k, ...] that end at its
        lengths[b]-th new entry."""
        idx = lengths.view(-1, 1) + torch.arange(keep, device=window.device).view(1, -1)
        idx = idx.view(*idx.shape, *([1] * (window.dim() - 2))).expand(-1, -1, *window.shape[2:])
        return window.gather(1, idx)

    # ---- the n-gram history -----------------------------------------------------------------
    def hash(
        self,
        hasher,
        input_ids: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Row ids [L, B, k, H] of the new tokens input_ids [B, k] (after everything this state has
        seen), advancing the history. doc_start [B, k]: True where a new document starts (its
        n-grams do not reach back before it)."""
        if hasher.config != self.config:
            raise ValueError("EngramState.hash: hasher.config must equal the state's config")
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"EngramState.hash: input_ids must be [{self.batch_size}, k], got {tuple(input_ids.shape)}"
            )
        B, k = input_ids.shape
        n = self.history
        lengths = self._lengths(lengths, k)
        ids = input_ids.to(self.device, torch.int64)
        window = torch.cat([self.ids, ids], dim=1)  # [B, n + k]
        # The window's first id of the current document is a document start: the n-grams of the
        # new tokens then read exactly the history they would read in the full sequence.
        starts = torch.zeros(B, n + k, dtype=torch.bool, device=self.device)
        starts.scatter_(1, (n - self.filled).view(-1, 1), True)
        if doc_start is not None:
            if doc_start.shape != input_ids.shape:
                raise ValueError(
                    f"EngramState.hash: doc_start must be {tuple(input_ids.shape)} like input_ids, "
                    f"got {tuple(doc_start.shape)}"
                )
            starts[:, n:] |= doc_start.to(self.device, torch.bool)
        rows = hasher(window.to(hasher.lut.device), doc_start=starts.to(hasher.lut.device))[:, :, n:]
        # Advance: the history now ends at each sequence's last valid new id.
        valid = torch.arange(k, device=self.device).view(1, -1) < lengths.view(-1, 1)
        self.ids = self._advance(window, lengths, n)
        if doc_start is not None:
            # Ids since the last valid document start among the new ones, else all of them.
            pos = torch.arange(k, device=self.device).view(1, -1).expand(B, k)
            last = torch.where(starts[:, n:] & valid, pos, torch.full_like(pos, -1)).amax(dim=1)
            since = torch.where(last >= 0, lengths - last, self.filled + lengths)
        else:
            since = self.filled + lengths
        self.filled = since.clamp(max=n)
        return rows

    # ---- the conv history of one layer ------------------------------------------------------
    def conv_step(self, layer_id: int, u: torch.Tensor, conv, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """conv(window) over the layer's U history and the new u [B, k, M, D]: the conv output of
        the new tokens; the history advances by lengths."""
        W = self.conv_window
        B, k = u.shape[:2]
        if B != self.batch_size:
            raise ValueError(f"EngramState: u must have batch {self.batch_size}, got {B}")
        hist = self.conv.get(layer_id)
        if hist is None or hist.shape[2:] != u.shape[2:] or hist.dtype != u.dtype or hist.device != u.device:
            if hist is not None:
                raise ValueError(
                    f"EngramState: layer {layer_id}'s conv history is {tuple(hist.shape)} {hist.dtype} on "
                    f"{hist.device}, the new input {tuple(u.shape)} {u.dtype} on {u.device}"
                )
            hist = u.new_zeros(B, W, *u.shape[2:])
        window = torch.cat([hist, u], dim=1)
        y = conv(window)[:, W:]
        lengths = self._lengths(lengths, k).to(u.device)
        self.conv[layer_id] = self._advance(window, lengths, W)
        return y

    def snapshot(self) -> tuple:
        """The histories as they are (steps replace them, never write them in place)."""
        return self.ids, self.filled, dict(self.conv)

    def restore(self, snap: tuple) -> None:
        self.ids, self.filled, conv = snap
        self.conv = dict(conv)

    def to(self, device) -> EngramState:
        self.device = torch.device(device)
        self.ids, self.filled = self.ids.to(device), self.filled.to(device)
        self.conv = {k: v.to(device) for k, v in self.conv.items()}
        return self
