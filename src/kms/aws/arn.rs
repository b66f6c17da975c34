//! AWS identifiers, validated when built: a KMS key ARN and an IAM role ARN.
//! Everything downstream (sessions, clients, messages, replica regions)
//! works with these values, never with strings checked somewhere else.

use std::fmt;

use crate::kms::InvalidIdentifier;

/// `arn:PARTITION:kms:REGION:ACCOUNT:key/ID` or `...:alias/NAME`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyArn {
    partition: String,
    region: String,
    account: String,
    /// `key/ID` or `alias/NAME`.
    resource: String,
}

impl KeyArn {
    pub fn parse(arn: &str) -> Result<Self, InvalidIdentifier> {
        let bad = |why: &str| {
            Err(InvalidIdentifier(format!(
                "invalid AWS KMS key ARN {arn:?}: {why} (expected arn:aws:kms:REGION:ACCOUNT_ID:key/KEY_ID or ...:alias/NAME)"
            )))
        };
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let [prefix, partition, service, region, account, resource] = parts[..] else {
            return bad("not a KMS ARN");
        };
        if prefix != "arn" || !is_partition(partition) || service != "kms" {
            return bad("not a KMS ARN");
        }
        if !is_region(region) {
            return bad("bad region");
        }
        if !is_account_id(account) {
            return bad("the account id must be 12 digits");
        }
        let resource_ok = match resource.split_once('/') {
            Some(("key", id)) => {
                !id.is_empty()
                    && id.len() <= 128
                    && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }
            Some(("alias", name)) => {
                !name.is_empty()
                    && name.len() <= 250
                    && !name.starts_with("aws/")
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
            }
            _ => false,
        };
        if !resource_ok {
            return bad("the resource must be key/ID or alias/NAME (not an AWS-managed alias)");
        }
        Ok(Self {
            partition: partition.to_owned(),
            region: region.to_owned(),
            account: account.to_owned(),
            resource: resource.to_owned(),
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// A key ARN, not an alias (aliases are per region, key ids are not).
    pub fn is_key(&self) -> bool {
        self.resource.starts_with("key/")
    }

    /// The same key in another region: multi-Region replicas share the key
    /// id and account, only the region differs.
    pub fn in_region(&self, region: &str) -> Self {
        Self {
            region: region.to_owned(),
            ..self.clone()
        }
    }
}

impl fmt::Display for KeyArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:{}:kms:{}:{}:{}",
            self.partition, self.region, self.account, self.resource
        )
    }
}

impl fmt::Debug for KeyArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyArn({self})")
    }
}

/// `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RoleArn(String);

impl RoleArn {
    pub fn parse(arn: &str) -> Result<Self, InvalidIdentifier> {
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let ok = matches!(
            parts[..],
            [prefix, partition, "iam", "", account, resource]
                if prefix == "arn"
                    && is_partition(partition)
                    && is_account_id(account)
                    && resource.strip_prefix("role/").is_some_and(|name| {
                        !name.is_empty()
                            && name.len() <= 512
                            && name
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"/+=,.@_-".contains(&b))
                    })
        );
        if ok {
            Ok(Self(arn.to_owned()))
        } else {
            Err(InvalidIdentifier(format!(
                "invalid IAM role ARN {arn:?}: expected arn:aws:iam::ACCOUNT_ID:role/NAME"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleArn({})", self.0)
    }
}

fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_partition(s: &str) -> bool {
    matches!(s, "aws" | "aws-cn" | "aws-us-gov" | "aws-iso" | "aws-iso-b")
}

/// An AWS region name such as `us-east-1`, `eu-central-2`, `us-gov-west-1`.
pub fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_arns_parse_round_trip_and_move_region() {
        let text = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1234abcd";
        let arn = KeyArn::parse(text).unwrap();
        assert_eq!(arn.to_string(), text);
        assert_eq!(arn.region(), "eu-west-1");
        assert!(arn.is_key());
        assert_eq!(
            arn.in_region("us-east-2").to_string(),
            "arn:aws:kms:us-east-2:111122223333:key/mrk-1234abcd"
        );
        // A region-like account id does not confuse the region swap.
        let odd = KeyArn::parse("arn:aws:kms:eu-west-1:111122223333:alias/eu-west-1").unwrap();
        assert!(!odd.is_key());
        assert_eq!(
            odd.in_region("us-east-1").to_string(),
            "arn:aws:kms:us-east-1:111122223333:alias/eu-west-1"
        );
    }

    #[test]
    fn bad_key_arns_say_why() {
        for (arn, why) in [
            ("arn:aws:kms:eu-west-1:111122223333", "not a KMS ARN"),
            ("arn:aws:s3:eu-west-1:111122223333:key/k", "not a KMS ARN"),
            ("arn:aws:kms:moon:111122223333:key/k", "bad region"),
            ("arn:aws:kms:eu-west-1:1111:key/k", "12 digits"),
            (
                "arn:aws:kms:eu-west-1:111122223333:alias/aws/ebs",
                "AWS-managed",
            ),
            ("arn:aws:kms:eu-west-1:111122223333:key/", "resource"),
            ("arn:aws:kms:eu-west-1:111122223333:key/k\n", "resource"),
        ] {
            let err = KeyArn::parse(arn).unwrap_err().to_string();
            assert!(err.contains(why), "{arn}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn role_arns() {
        let role = RoleArn::parse("arn:aws:iam::111122223333:role/path/keybroker-access").unwrap();
        assert_eq!(
            role.as_str(),
            "arn:aws:iam::111122223333:role/path/keybroker-access"
        );
        for bad in [
            "arn:aws:iam::111122223333:user/bob",
            "arn:aws:iam:eu-west-1:111122223333:role/r",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:sts::111122223333:role/r",
        ] {
            assert!(RoleArn::parse(bad).is_err(), "{bad}");
        }
    }
}
