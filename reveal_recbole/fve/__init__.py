"""FVE (Feedback-Guided Visual Extraction): REVEAL's prompt-conditioned image features.

Each step of the method is a small function or class in its own module, so the FVE loop is
their composition: ``prompt`` (initial prompts), ``extract`` + ``cache`` (prompt-conditioned
image features, only changed prompts recomputed), ``feedback`` (per-item ranking statistics
on the validation split), ``select`` (priority and the hard items), ``critic`` (rewritten
prompts for the hard items).
"""
