//! The `aws_*` settings.

use super::*;

crate::settings::identity_cache_flags!(
    AwsIdentityCache,
    "aws",
    "AWS",
    "customer role sessions (with their KMS clients)"
);

/// The `aws_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AwsSettings {
    /// Region of the platform's own STS calls (the key's region is used for
    /// KMS).
    #[arg(
        id = "aws_region",
        long = "aws-region",
        env = "KEYBROKER_AWS_REGION",
        default_value = "us-east-1"
    )]
    pub region: String,
    /// AWS KMS endpoint for every region (VPC or FIPS endpoint, or moto in
    /// tests).
    #[arg(
        id = "aws_kms_endpoint",
        long = "aws-kms-endpoint",
        env = "KEYBROKER_AWS_KMS_ENDPOINT"
    )]
    pub kms_endpoint: Option<String>,
    /// AWS KMS endpoint of one region, repeatable: --aws-kms-region-endpoint
    /// us-east-1=https://... (wins over --aws-kms-endpoint; the last one
    /// given for a region wins).
    #[arg(id = "aws_kms_region_endpoints", long = "aws-kms-region-endpoint", value_parser = parse_region_endpoint)]
    pub kms_region_endpoints: Vec<(String, String)>,
    /// AWS STS endpoint.
    #[arg(
        id = "aws_sts_endpoint",
        long = "aws-sts-endpoint",
        env = "KEYBROKER_AWS_STS_ENDPOINT"
    )]
    pub sts_endpoint: Option<String>,
    /// Lifetime of assumed customer-role sessions (15m to the role's maximum).
    #[arg(id = "aws_session_duration", long = "aws-session-duration", env = "KEYBROKER_AWS_SESSION_DURATION", value_parser = humantime::parse_duration, default_value = "1h")]
    pub session_duration: Duration,
    /// Attempts per AWS call, first included; only transient errors retry.
    #[arg(
        id = "aws_max_attempts",
        long = "aws-max-attempts",
        env = "KEYBROKER_AWS_MAX_ATTEMPTS",
        default_value = "3"
    )]
    pub max_attempts: u32,
    /// Not configurable: connecting to an AWS endpoint is quick or broken.
    #[arg(skip = Duration::from_secs(2))]
    pub connect_timeout: Duration,
    /// Deadline of one AWS call attempt.
    #[arg(id = "aws_attempt_timeout", long = "aws-attempt-timeout", env = "KEYBROKER_AWS_ATTEMPT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "3s")]
    pub attempt_timeout: Duration,
    /// Deadline of one AWS call, retries included.
    #[arg(id = "aws_operation_timeout", long = "aws-operation-timeout", env = "KEYBROKER_AWS_OPERATION_TIMEOUT", value_parser = humantime::parse_duration, default_value = "8s")]
    pub operation_timeout: Duration,
    #[command(flatten)]
    pub identity: AwsIdentityCache,
}

impl Default for AwsSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl AwsSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::invalid;
        if !(900..=43_200).contains(&self.session_duration.as_secs()) {
            return invalid(
                "aws_session_duration",
                "must be between 15m and 12h (the limits of STS AssumeRole)",
            );
        }
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return invalid("aws_max_attempts", "must be 1 to 10");
        }
        self.identity.validate()?;
        if self.attempt_timeout > self.operation_timeout {
            return invalid(
                "aws_attempt_timeout",
                "must not be longer than aws_operation_timeout",
            );
        }
        Ok(())
    }

    /// The KMS endpoint of `region`: its own, else the shared one.
    pub(super) fn kms_endpoint_of(&self, region: &str) -> Option<&str> {
        self.kms_region_endpoints
            .iter()
            .rev()
            .find(|(r, _)| r == region)
            .map(|(_, url)| url.as_str())
            .or(self.kms_endpoint.as_deref())
    }
}

pub(super) fn parse_region_endpoint(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(r, u)| (r.to_owned(), u.to_owned()))
        .ok_or_else(|| format!("{text:?} is not REGION=URL"))
}
