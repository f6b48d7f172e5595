-- A row is rewritten once per merge level, and a level costs ≈ 1.4–1.8 µs of CPU per row (chDB 4.4,
-- realistic evidence rows; no codec, granularity or engine change moved that by more than ±10 %). With
-- MergeTree's default selector (merge_selector_base = 5) merges start at about 5 parts of a size, so a row
-- goes through log5(part size reached ÷ insert size) levels; here merges start at 10 parts, log10 of it,
-- ≈ 30 % fewer levels at any horizon. bench/merge_cost.py --stream, 1,080,000 rows inserted in parts of
-- 30,000 then merged to one part: 5.04 µs per row against 5.50–5.70 (inserts + every merge). Readers see
-- up to 9 parts of a size instead of about 4 (evidence_current reads the latest version of each call with
-- ORDER BY … LIMIT 1 BY, right with any number of parts). Applies to the tables the sink writes in bulk.

ALTER TABLE {db}.evidence MODIFY SETTING min_parts_to_merge_at_once = 10;

ALTER TABLE {db}.tool_calls MODIFY SETTING min_parts_to_merge_at_once = 10;

ALTER TABLE {db}.tool_results MODIFY SETTING min_parts_to_merge_at_once = 10;
