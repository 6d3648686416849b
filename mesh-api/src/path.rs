//! Request path normalization for authorization: the path a policy is matched against must be
//! the resource the app will serve, or an encoded path slips past a DENY. The rules are
//! Envoy's `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action:
//! REJECT_REQUEST` (so Envoy, configured so by the controller, sees the same path), and refuse
//! a few more things Envoy passes but an app may read as another path. `;` parameters are
//! kept, as Envoy keeps them; the controller makes policies safe against them. The reference
//! is `docs/reference/policy.md`.

use std::borrow::Cow;
use std::fmt;

/// Why a path is refused (the request is answered 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not `/...` (or `*`).
    NotOrigin,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` or `%5C`: a slash an app may decode after routing.
    EscapedSlash,
    /// A NUL, raw or `%00`.
    Nul,
    /// `%25` followed by two hex digits: decoded twice, it is another path.
    DoubleEscape,
    /// A `#`: fragments are never sent.
    Fragment,
    /// A control character, space or `DEL`.
    Control,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotOrigin => "the path does not start with /",
            PathError::BadEscape => "a % is not followed by two hex digits",
            PathError::EscapedSlash => "an encoded slash or backslash (%2F, %5C)",
            PathError::Nul => "a NUL character",
            PathError::DoubleEscape => "a double percent-encoding (%25 and two hex digits)",
            PathError::Fragment => "a fragment (#)",
            PathError::Control => "a control character",
        })
    }
}

impl std::error::Error for PathError {}

/// The value of one hex digit, either case.
pub fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalizes the path of a request (without its query): percent-decoded where that is safe
/// (unreserved characters), `\\` turned into `/`, slashes merged, dot segments (also `..;x`)
/// removed. `*` (as in `OPTIONS *`) is kept.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    // Most paths are already normal: nothing to decode, merge or resolve, nothing to allocate.
    let plain = path.starts_with('/')
        && path
            .bytes()
            .all(|b| b > b' ' && b != 0x7f && !matches!(b, b'%' | b'\\' | b'#'))
        && !path.contains("//")
        && !path.contains("/.");
    if plain || path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    let raw = path.as_bytes();
    if raw.first() != Some(&b'/') && raw.first() != Some(&b'\\') {
        return Err(PathError::NotOrigin);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let d = hi << 4 | lo;
                match d {
                    0 => return Err(PathError::Nul),
                    b'/' | b'\\' => return Err(PathError::EscapedSlash),
                    d if unreserved(d) => out.push(d),
                    _ => out.extend_from_slice(&raw[i..i + 3]),
                }
                i += 3;
                continue;
            }
            0 => return Err(PathError::Nul),
            b'#' => return Err(PathError::Fragment),
            b'\\' => out.push(b'/'),
            b if b < 0x20 || b == 0x7f || b == b' ' => return Err(PathError::Control),
            _ => out.push(b),
        }
        i += 1;
    }
    // Only ASCII was replaced above, so the bytes are still UTF-8.
    let decoded = String::from_utf8(out).map_err(|_| PathError::Control)?;
    // Checked on what the app gets: decoding can make a double escape of what was none
    // (`%25%36%31` becomes `%2561`).
    if double_escape(&decoded) {
        return Err(PathError::DoubleEscape);
    }
    Ok(Cow::Owned(resolve(decoded.split('/'))))
}

/// Whether `%25` is followed by two hex digits somewhere in `s`.
fn double_escape(s: &str) -> bool {
    s.as_bytes()
        .windows(5)
        .any(|w| w.starts_with(b"%25") && hex(w[3]).is_some() && hex(w[4]).is_some())
}

/// Every `%XX` escape decoded (invalid ones kept as written), bytes that are not UTF-8 replaced.
/// For reading what a percent-encoded string says, not for normalizing request paths.
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Joins segments into an absolute path without empty, `.` or `..` segments; a trailing slash
/// (or a trailing dot segment) is kept as one.
fn resolve<'a>(segments: impl Iterator<Item = &'a str>) -> String {
    let mut stack: Vec<&str> = Vec::new();
    let mut trailing = false;
    // The first segment is the empty one before the leading slash.
    for seg in segments.skip(1) {
        trailing = true;
        // `..;x` is a dot segment too, as Envoy (and Tomcat) read it.
        match seg.split_once(';').map_or(seg, |(name, _)| name) {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            _ => {
                stack.push(seg);
                trailing = false;
            }
        }
    }
    let mut p = String::with_capacity(64);
    for s in &stack {
        p.push('/');
        p.push_str(s);
    }
    if trailing || stack.is_empty() {
        p.push('/');
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(percent_decode("a%2Fb%2fc"), "a/b/c");
        assert_eq!(percent_decode("%zz%4%"), "%zz%4%");
        assert_eq!(percent_decode("%E2%82%AC"), "\u{20ac}");
        assert_eq!(percent_decode("%FF"), "\u{fffd}");
    }

    #[test]
    fn normalizes_like_envoy() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//a///b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../b", "/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2E/admin", "/admin"),
            ("/x/%2e%2e/admin", "/admin"),
            ("/a\\b", "/a/b"),
            ("\\admin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/a%3bb", "/a%3bb"),
            ("/admin;x=1", "/admin;x=1"),
            ("/admin;x=1/secret", "/admin;x=1/secret"),
            ("/public/..;/admin", "/admin"),
            ("/public/.;x/admin", "/public/admin"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refuses_what_an_app_may_read_as_another_path() {
        for (input, err) in [
            ("admin", PathError::NotOrigin),
            ("", PathError::NotOrigin),
            ("/a%2Fb", PathError::EscapedSlash),
            ("/a%2fb", PathError::EscapedSlash),
            ("/a%5cb", PathError::EscapedSlash),
            ("/a%00", PathError::Nul),
            ("/a\0", PathError::Nul),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/%2561dmin", PathError::DoubleEscape),
            // Found by the `path_policy` fuzz target: escapes that decode to hex digits
            // after a `%25`.
            ("/%25a%61dn", PathError::DoubleEscape),
            ("/%25%36%31dmin", PathError::DoubleEscape),
            ("/%25%3%31", PathError::BadEscape),
            ("/a#b", PathError::Fragment),
            ("/a\tb", PathError::Control),
            ("/a b", PathError::Control),
        ] {
            assert_eq!(normalize(input), Err(err), "{input:?}");
        }
    }
}
