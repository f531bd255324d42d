DROP TABLE policy_version;
DROP TABLE grants;
DROP TABLE roles;
