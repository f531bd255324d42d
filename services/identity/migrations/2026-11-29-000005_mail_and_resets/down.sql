DROP INDEX users_entity;
DROP TABLE password_resets;
DROP TABLE outgoing_mail;
