-- Merges of evidence parts past 0006's 256 MiB (≈ 210,000 rows) wrote wide parts, a file per column:
-- 2.36 µs of CPU per merged row against 1.68 for the same merge written compact (chDB 4.4, four parts
-- of 60,000 realistic evidence rows merged into one, bench/merge_cost.py). Every merge level above that
-- size is paid by each row again, so evidence parts stay compact up to 16 GiB. What readers lose is
-- column pruning inside a part. Nearly every evidence query goes through evidence_current (the whole
-- row), and a warm one-column scan cost 4.2 instead of 3.6 ms, a point lookup 8.7 instead of 15 ms.

ALTER TABLE {db}.evidence MODIFY SETTING min_bytes_for_wide_part = 17179869184;
