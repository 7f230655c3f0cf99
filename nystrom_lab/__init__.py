"""nystrom_lab: the measurements behind the book and benchmarks/, built on nystrom_np.

The model (``nystrom_np``) never imports this package. Here live the studies of Part II
(``study``), the one timing and memory harness (``timing``), the other efficient attentions
(``approximations``), the pretrained all-MiniLM-L6-v2 stand-in and its English text
(``pretrained``), which weights a chapter runs on and synthetic inputs (``sources``), and
figure helpers (``plotting``).
"""
