//! `meshctl explain --from <ns>/<workload> [METHOD] URL [-H 'name: value']...`: what the mesh
//! does with one request, as the controller reads it from the model it builds every proxy's
//! xDS from (`/debug/explain`): the Service and port, the route rule (or what came closest),
//! the backends and shares, timeouts and retries, the TrafficPolicy, the authorization
//! decision with the policy that made it, the rate limit and the endpoints.

use std::io::Write;

use anyhow::bail;

use super::stat::ControllerArgs;
use super::status::Output;

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The calling workload: `<namespace>/<workload>`.
    #[arg(long)]
    pub from: String,
    /// `[METHOD] URL`: the method (default GET) and `http://host[:port]/path?query`.
    #[arg(required = true, num_args = 1..=2)]
    pub request: Vec<String>,
    /// A request header, `name: value`; may be repeated.
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    #[command(flatten)]
    pub controller: ControllerArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The controller's query for these arguments; an error names the argument at fault.
pub fn query(a: &ExplainArgs) -> anyhow::Result<String> {
    let (method, url) = match a.request.as_slice() {
        [url] => ("GET", url.as_str()),
        [method, url] => (method.as_str(), url.as_str()),
        _ => bail!("expected [METHOD] URL"),
    };
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("from", &a.from)
        .append_pair("method", method)
        .append_pair("url", url);
    for h in &a.headers {
        let Some((name, value)) = h.split_once(':') else {
            bail!("-H {h:?}: expected 'name: value'");
        };
        if name.trim().is_empty() {
            bail!("-H {h:?}: the header name is empty");
        }
        q.append_pair("header", &format!("{}:{}", name.trim(), value.trim()));
    }
    Ok(format!("/debug/explain?{}", q.finish()))
}

pub async fn explain(
    a: &ExplainArgs,
    cx: &super::Context,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let path = query(a)?;
    let ctl = a.controller.endpoint(cx).await?;
    let e = ctl.json(&path).await.map_err(|e| {
        // The controller's refusal of the question (400) names the parameter already.
        if crate::admin::is_client_error(&e) {
            e
        } else {
            e.context(format!(
                "explaining the request with the controller at {ctl}; {}",
                crate::admin::CONTROLLER_HINT
            ))
        }
    })?;
    crate::output::print(a.output, &e, out, |e, out| {
        for line in e["words"].as_array().into_iter().flatten() {
            writeln!(out, "{}", line.as_str().unwrap_or_default())?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: ExplainArgs,
    }

    #[test]
    fn the_request_becomes_one_query() {
        let cli = Cli::try_parse_from([
            "explain",
            "--from",
            "default/productpage",
            "GET",
            "http://reviews:9080/api/v1?x=1&y=2",
            "-H",
            "x-canary: yes",
        ])
        .expect("parses");
        assert_eq!(
            query(&cli.a).expect("query"),
            "/debug/explain?from=default%2Fproductpage&method=GET&url=http%3A%2F%2Freviews%3A9080%2Fapi%2Fv1%3Fx%3D1%26y%3D2&header=x-canary%3Ayes"
        );
        let cli = Cli::try_parse_from(["explain", "--from", "a/b", "http://x/", "-H", "nocolon"])
            .expect("parses");
        assert!(
            query(&cli.a)
                .expect_err("bad header")
                .to_string()
                .contains("-H \"nocolon\"")
        );
    }
}
