"""Silence the known-noise warnings of this environment, each by category, module and message.

Why: every ``import lavis_free`` printed fairscale's FutureWarnings (fairscale 0.4.4, pulled in
by LAVIS, decorates with torch's deprecated ``torch.cuda.amp.custom_fwd/bwd``), every
``python -m lavis_free.<module>`` printed runpy's RuntimeWarning (``import lavis_free``
registers everything, so the module is already imported when runpy runs it as ``__main__``;
harmless, as none of them keeps state at import), every hub load by transformers 4.26
printed huggingface_hub's FutureWarning about the ``resume_download`` argument it passes, and
every import of transformers 4.33 (the second stack) printed, twice, torch's FutureWarning about
the deprecated pytree function it calls. None of them is actionable by a user. Each filter
matches only its own warning, so any other warning, from these modules too, stays visible.
"""
import warnings

KNOWN_NOISE = (
    # (category, module regex, message regex)
    (FutureWarning, r"fairscale\.", r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated"),
    (RuntimeWarning, r"runpy", r"'lavis_free\.[\w.]+' found in sys\.modules after import of package"),
    (FutureWarning, r"huggingface_hub\.file_download", r"`resume_download` is deprecated"),
    (FutureWarning, r"transformers\.utils\.generic", r"`torch\.utils\._pytree\._register_pytree_node` is deprecated"),
)


def silence_known_noise() -> None:
    """Install one ``ignore`` filter per entry of :data:`KNOWN_NOISE`."""
    for category, module, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
