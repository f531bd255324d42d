DROP TABLE IF EXISTS duplicate_pairs;
DROP TABLE IF EXISTS duplicate_scans;
