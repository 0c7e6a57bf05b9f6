"""Evaluation of SR outputs against references: PSNR/SSIM on Y, LPIPS, DISTS, pyiqa metrics."""
