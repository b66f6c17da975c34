-- Customer keys in Vault/OpenBao Transit (issue 18), and room for the
-- providers planned next (PKCS#11 tokens, Azure Key Vault), so the CHECK
-- is widened once.
ALTER TABLE key_bindings DROP CONSTRAINT key_bindings_provider_check;
ALTER TABLE key_bindings ADD CONSTRAINT key_bindings_provider_check
    CHECK (provider IN ('local', 'aws-kms', 'gcp-kms', 'vault-transit', 'pkcs11', 'azure-kv'));
