//! `kiln events list|show`: build-event streams, for a person at a terminal.

use std::time::Duration;

use kiln_proto::bes::{build_event, OrderedBuildEvent};
use kiln_proto::events::build_events_client::BuildEventsClient;
use kiln_proto::events::{GetStreamRequest, ListStreamsRequest, ReadEventsRequest, Stream};
use prost::Message;
use tonic::transport::Channel;

pub enum Action {
    List { endpoint: String, pattern: String, limit: usize },
    Show { endpoint: String, stream: String },
}

async fn client(endpoint: &str) -> anyhow::Result<BuildEventsClient<Channel>> {
    let hp = endpoint.split("://").nth(1).unwrap_or(endpoint).trim_end_matches('/');
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{hp}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {endpoint}: {e}"))?;
    Ok(BuildEventsClient::new(ch).max_decoding_message_size(64 << 20))
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    match t {
        Some(t) => {
            let secs = t.seconds.rem_euclid(86_400);
            let days = t.seconds.div_euclid(86_400);
            let (y, m, d) = civil_from_days(days);
            format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
        }
        None => "(no time)".into(),
    }
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn print_stream(s: &Stream, width: usize) {
    println!(
        "{:<width$} {:<10} {:>7} {:<9} {}  {}",
        s.stream_id,
        s.component,
        s.event_count,
        if s.finished { "finished" } else { "open" },
        time(&s.first_event_time),
        time(&s.last_event_time)
    );
}

/// One line about an event's content.
fn describe(e: &OrderedBuildEvent) -> String {
    use build_event::Event as E;
    match e.event.as_ref().and_then(|b| b.event.as_ref()) {
        Some(E::BazelEvent(any)) | Some(E::BuildExecutionEvent(any)) | Some(E::SourceFetchEvent(any)) => {
            format!("{} ({} bytes)", any.type_url.rsplit('/').next().unwrap_or(&any.type_url), any.value.len())
        }
        Some(E::ConsoleOutput(c)) => match &c.output {
            Some(build_event::console_output::Output::TextOutput(t)) => format!("{:?}", t.chars().take(120).collect::<String>()),
            Some(build_event::console_output::Output::BinaryOutput(b)) => format!("{} bytes", b.len()),
            None => String::new(),
        },
        Some(E::BuildFinished(f)) => format!("status {:?}", f.status.as_ref().map(|s| s.result)),
        Some(E::InvocationAttemptFinished(f)) => format!("status {:?}", f.invocation_status.as_ref().map(|s| s.result)),
        Some(E::InvocationAttemptStarted(s)) => format!("attempt {}", s.attempt_number),
        Some(E::ComponentStreamFinished(f)) => format!("type {}", f.r#type),
        _ => String::new(),
    }
}

pub async fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::List { endpoint, pattern, limit } => {
            let mut c = client(&endpoint).await?;
            let (mut token, mut streams, mut more) = (String::new(), Vec::new(), false);
            'pages: loop {
                let page = c
                    .list_streams(ListStreamsRequest { pattern: pattern.clone(), page_size: 500, page_token: token })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                    .into_inner();
                for s in page.streams {
                    if streams.len() >= limit {
                        more = true;
                        break 'pages;
                    }
                    streams.push(s);
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            let width = streams.iter().map(|s| s.stream_id.len()).max().unwrap_or(0).max(6);
            println!("{:<width$} {:<10} {:>7} {:<9} {:<19}  LAST EVENT", "STREAM", "COMPONENT", "EVENTS", "STATE", "FIRST EVENT");
            for s in &streams {
                print_stream(s, width);
            }
            if more {
                eprintln!("(more streams; narrow --match or raise --limit)");
            }
            eprintln!("{} stream(s)", streams.len());
        }
        Action::Show { endpoint, stream } => {
            let mut c = client(&endpoint).await?;
            let s = c
                .get_stream(GetStreamRequest { stream_id: stream.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                .into_inner();
            println!("stream     {}", s.stream_id);
            println!("build      {}", s.build_id);
            println!("invocation {}", if s.invocation_id.is_empty() { "-" } else { &s.invocation_id });
            println!("component  {}", s.component);
            println!("events     {} ({})", s.event_count, if s.finished { "finished" } else { "open" });
            println!("first      {}", time(&s.first_event_time));
            println!("last       {}", time(&s.last_event_time));
            println!();
            let mut after = 0;
            loop {
                let page = c
                    .read_events(ReadEventsRequest { stream_id: stream.clone(), after_sequence_number: after, page_size: 1000 })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                    .into_inner();
                for e in &page.events {
                    let detail = OrderedBuildEvent::decode(&e.ordered_build_event[..]).map(|o| describe(&o)).unwrap_or_default();
                    println!("{:>6}  {}  {:<28} {}", e.sequence_number, time(&e.event_time), e.kind, detail);
                }
                if page.events.is_empty() || page.complete {
                    break;
                }
                after = page.next_after_sequence_number;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn days_become_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_784), (2026, 11, 27));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
