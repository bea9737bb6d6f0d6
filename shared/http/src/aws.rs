//! AWS Signature Version 4 for connections with `auth: aws_sigv4`: where the credentials come
//! from ([`AwsCredentialSource`]) and how a finished request is signed (with the `aws-sigv4`
//! crate, the signer the AWS SDK for Rust uses).
//!
//! Guarantees: a secret access key or session token is never shown by `Debug` nor put in an error
//! message; [`EnvAwsCredentials`] reads only the standard AWS environment variables and never
//! names their values.

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;

/// Environment variable holding the access key ID.
pub const AWS_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
/// Environment variable holding the secret access key.
pub const AWS_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// Environment variable holding the session token of temporary credentials.
pub const AWS_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";

/// Longest region or service name accepted.
const MAX_SCOPE_PART_LEN: usize = 64;

/// A set of AWS credentials. `Debug` shows the access key ID only.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Present for temporary credentials (an assumed role, a Lambda function's role).
    pub session_token: Option<String>,
}

impl AwsCredentials {
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
    ) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token,
        }
    }
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[REDACTED]")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "[REDACTED]"),
            )
            .finish()
    }
}

/// Where the AWS credentials that sign `aws_sigv4` requests come from; asked on every call, so a
/// source may rotate them. An error says why there are none and never contains a secret value.
#[async_trait]
pub trait AwsCredentialSource: Send + Sync {
    async fn credentials(&self) -> Result<AwsCredentials, String>;
}

/// The standard AWS environment variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and,
/// for temporary credentials, `AWS_SESSION_TOKEN`. Lambda sets these to the function role's
/// credentials. Read on every call; an empty variable counts as unset.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnvAwsCredentials;

impl EnvAwsCredentials {
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl AwsCredentialSource for EnvAwsCredentials {
    async fn credentials(&self) -> Result<AwsCredentials, String> {
        credentials_from(|name| std::env::var(name))
    }
}

/// Credentials from a lookup of environment variables (the real environment, or a test's).
fn credentials_from(
    lookup: impl Fn(&str) -> Result<String, std::env::VarError>,
) -> Result<AwsCredentials, String> {
    let var = |name: &str| match lookup(name) {
        Ok(value) if value.is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("environment variable {name} is not valid UTF-8"))
        }
    };
    let access_key_id = var(AWS_ACCESS_KEY_ID)?;
    let secret_access_key = var(AWS_SECRET_ACCESS_KEY)?;
    let session_token = var(AWS_SESSION_TOKEN)?;
    match (access_key_id, secret_access_key) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(AwsCredentials {
            access_key_id,
            secret_access_key,
            session_token,
        }),
        (None, None) => Err(format!(
            "{AWS_ACCESS_KEY_ID} and {AWS_SECRET_ACCESS_KEY} are not set"
        )),
        (None, Some(_)) => Err(format!("{AWS_ACCESS_KEY_ID} is not set")),
        (Some(_), None) => Err(format!("{AWS_SECRET_ACCESS_KEY} is not set")),
    }
}

/// Fixed credentials (or none), for tests and the simulator. `Debug` shows no secret.
#[derive(Clone, Debug, Default)]
pub struct StaticAwsCredentials(Option<AwsCredentials>);

impl StaticAwsCredentials {
    pub fn new(credentials: AwsCredentials) -> Self {
        Self(Some(credentials))
    }

    /// A source that has no credentials.
    pub fn none() -> Self {
        Self(None)
    }
}

#[async_trait]
impl AwsCredentialSource for StaticAwsCredentials {
    async fn credentials(&self) -> Result<AwsCredentials, String> {
        self.0
            .clone()
            .ok_or_else(|| "no static AWS credentials were given".to_owned())
    }
}

/// A header the signature adds to the request.
pub(crate) struct SignatureHeader {
    pub(crate) name: &'static str,
    pub(crate) value: String,
    pub(crate) sensitive: bool,
}

/// Checks a region or service name before it goes into the credential scope.
pub(crate) fn check_scope_part(what: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= MAX_SCOPE_PART_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "aws_sigv4 {what} must be 1 to {MAX_SCOPE_PART_LEN} letters, digits, '-', '_' or '.'"
        ))
    }
}

/// The SigV4 signature of a finished request, as the headers to add: `X-Amz-Date`,
/// `Authorization`, `X-Amz-Security-Token` with a session token, and `x-amz-content-sha256` for S3
/// only. `url` is the exact URL sent and `headers` every header sent that is to be signed (with
/// `host`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn signature_headers(
    service: &str,
    region: &str,
    credentials: &AwsCredentials,
    time: SystemTime,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Vec<SignatureHeader>, String> {
    let identity = aws_credential_types::Credentials::new(
        credentials.access_key_id.clone(),
        credentials.secret_access_key.clone(),
        credentials.session_token.clone(),
        None,
        "riposte",
    )
    .into();
    let mut settings = SigningSettings::default();
    if service == "s3" {
        // S3 signs the path as sent, unnormalized, and requires the payload hash header.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("cannot sign the request: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into_parts();
    let (headers, _params) = instructions.into_parts();
    Ok(headers
        .into_iter()
        .map(|h| SignatureHeader {
            name: h.name(),
            value: h.value().to_owned(),
            sensitive: h.sensitive(),
        })
        .collect())
}

/// `pairs` as a query string in SigV4's canonical encoding (every byte but `A-Z a-z 0-9 - _ . ~`
/// percent-encoded, spaces as `%20`), so the query sent is exactly the one signed.
pub(crate) fn encode_query(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, name);
        out.push('=');
        encode_into(&mut out, value);
    }
    out
}

fn encode_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::env::VarError;
    use std::time::Duration;

    fn lookup<'a>(
        vars: &'a [(&'a str, &'a str)],
    ) -> impl Fn(&str) -> Result<String, VarError> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
                .ok_or(VarError::NotPresent)
        }
    }

    #[test]
    fn environment_credentials() {
        let c = credentials_from(lookup(&[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "CANARY-secret"),
            ("AWS_SESSION_TOKEN", "CANARY-token"),
        ]))
        .unwrap();
        assert_eq!(
            c,
            AwsCredentials::new("AKID", "CANARY-secret", Some("CANARY-token".into()))
        );
        let c = credentials_from(lookup(&[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "CANARY-secret"),
            ("AWS_SESSION_TOKEN", ""),
        ]))
        .unwrap();
        assert_eq!(c.session_token, None);
    }

    #[test]
    fn missing_environment_credentials_name_the_variables_only() {
        let e = credentials_from(lookup(&[])).unwrap_err();
        assert_eq!(e, "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set");
        let e = credentials_from(lookup(&[("AWS_SECRET_ACCESS_KEY", "CANARY")])).unwrap_err();
        assert_eq!(e, "AWS_ACCESS_KEY_ID is not set");
        let e = credentials_from(lookup(&[
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_SESSION_TOKEN", "CANARY"),
        ]))
        .unwrap_err();
        assert_eq!(e, "AWS_SECRET_ACCESS_KEY is not set");
        let e = credentials_from(|_| Err(VarError::NotUnicode("x".into()))).unwrap_err();
        assert!(e.contains("not valid UTF-8") && !e.contains('x'), "{e}");
    }

    #[test]
    fn debug_hides_secrets() {
        let c = AwsCredentials::new("AKID", "CANARY-secret", Some("CANARY-token".into()));
        let shown = format!("{c:?} {:?}", StaticAwsCredentials::new(c.clone()));
        assert!(
            shown.contains("AKID") && !shown.contains("CANARY"),
            "{shown}"
        );
    }

    #[test]
    fn scope_parts() {
        assert!(check_scope_part("region", "us-east-1").is_ok());
        assert!(check_scope_part("service", "execute-api").is_ok());
        for bad in ["", "us east", "a/b", "x\r\n", &"a".repeat(65)] {
            assert!(check_scope_part("region", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn canonical_query_encoding() {
        let q = encode_query(&[
            ("a b".into(), "x+y/=&~é".into()),
            ("Key-_.~".into(), String::new()),
        ]);
        assert_eq!(q, "a%20b=x%2By%2F%3D%26~%C3%A9&Key-_.~=");
    }

    /// The "get-vanilla" case of AWS's SigV4 test suite.
    #[test]
    fn aws_test_suite_get_vanilla() {
        let credentials = AwsCredentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
        );
        // 2015-08-30T12:36:00Z
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let headers = signature_headers(
            "service",
            "us-east-1",
            &credentials,
            time,
            "GET",
            "https://example.amazonaws.com/",
            &[("host", "example.amazonaws.com")],
            b"",
        )
        .unwrap();
        let get = |name: &str| {
            headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value.as_str())
        };
        assert_eq!(get("x-amz-date"), Some("20150830T123600Z"));
        assert_eq!(
            get("authorization"),
            Some(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
            )
        );
        assert_eq!(get("x-amz-security-token"), None);
        assert_eq!(get("x-amz-content-sha256"), None);
    }
}
