"""The engines (AR, SD, SSD): they drive the target and the speculators; nothing below imports them."""
