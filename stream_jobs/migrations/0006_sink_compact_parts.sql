-- The sink's inserts (10,000 rows, ~10 MB of evidence) were just above MergeTree's default
-- min_bytes_for_wide_part (10 MiB), so each became a wide part: a file per column and per
-- subcolumn. Writing a compact part (one file) costs half the CPU (chDB 4.4, 20k evidence rows:
-- 2.6 -> 1.3 µs per row). Parts stay compact up to 256 MiB; merges past that write wide parts.

ALTER TABLE {db}.evidence MODIFY SETTING min_bytes_for_wide_part = 268435456;

ALTER TABLE {db}.tool_calls MODIFY SETTING min_bytes_for_wide_part = 268435456;

ALTER TABLE {db}.tool_results MODIFY SETTING min_bytes_for_wide_part = 268435456;
