//! Content filter: the operator's keyword and regex lists, applied to prompts and completions.
//!
//! A [`FilterSet`] is built once per configuration snapshot from two option texts (one pattern per
//! line, or a JSON array of strings) and read by every worker without locks. [`FilterSet::check`]
//! scans a whole text; [`FilterSet::stream`] hands out a [`StreamFilter`] that scans a completion
//! chunk by chunk and still catches a match that straddles chunk boundaries.
//!
//! ## Matching rules
//!
//! - **Keywords** are literal substrings, matched case-insensitively for ASCII letters (other
//!   characters match exactly), all at once by one Aho-Corasick automaton.
//! - **Regexes** use the `regex` crate's syntax (linear time; no look-around groups, no back-references);
//!   they are case-sensitive unless they say `(?i)`. All of them are compiled into one `RegexSet`
//!   when its size limits allow, else kept as separate regexes.
//! - A text is blocked by the first keyword found, else by the lowest-numbered matching regex.
//!
//! ## Streaming
//!
//! A [`StreamFilter`] scans each chunk once, carrying state across chunk boundaries:
//!
//! - **Keywords**: it keeps the last `longest keyword - 1` bytes and rescans them with the next chunk,
//!   so a keyword matches across any split of a text exactly when it matches the whole text
//!   (property-tested below).
//! - **Regexes**: it walks one lazy DFA of all the regexes byte by byte, keeping the DFA state
//!   between chunks, so a match of any length is caught in the chunk that completes it, at a cost
//!   linear in the chunk. At each chunk's end it asks whether the text would match if it ended
//!   there, so look-ahead at the chunk's end (`$`, a trailing `\b`) sees the end of the text: `foo$`
//!   matches any chunk ending in `foo`. `^` matches only at the start of the stream.
//! - **Fallback bound**: the lazy DFA cannot go on past a non-ASCII byte when a regex uses a
//!   Unicode word boundary (`\b` without `(?-u)`), nor after its cache is reset, and is not built
//!   at all for regexes too large for it. From there on the stream filter rescans, on every push,
//!   the last [`REGEX_WINDOW_BYTES`] bytes before the chunk plus the chunk: a regex match of at most
//!   that many bytes is still caught; a longer one may be missed, and each push costs a scan of the
//!   window (~13 µs for 4 KiB). `(?-u:\b)` keeps the fast path.
//!
//! Never does I/O; never panics on any input.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind};
use regex::{Regex, RegexSet};
use regex_automata::hybrid::LazyStateID;
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

/// Bytes of earlier stream text that [`StreamFilter`] rescans for regexes on every push once it has
/// fallen back from the lazy DFA (see the module docs).
pub const REGEX_WINDOW_BYTES: usize = 4096;

/// Keyword lists up to this many bytes in total are compiled to a full DFA.
const DFA_KEYWORD_BYTES: usize = 32 * 1024;

/// Why a filter list could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("pattern list looks like JSON but is not an array of strings: {0}")]
    Json(String),
    #[error("regex {index} ({pattern:?}) is invalid: {message}")]
    Regex { index: usize, pattern: String, message: String },
    #[error("keyword list cannot be compiled: {0}")]
    Keywords(String),
}

/// Which list a match came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternKind {
    Keyword,
    Regex,
}

/// A blocked text: which pattern matched, as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub kind: PatternKind,
    /// Position of the pattern in its list, after empty entries were dropped.
    pub index: usize,
    pub pattern: String,
}

/// Splits an option text into patterns.
///
/// A text that parses as a JSON array of strings is that array, each entry taken verbatim. Any other
/// text is one pattern per line, each line trimmed of surrounding whitespace. Empty patterns are
/// dropped in both forms, since an empty pattern would match everything.
pub fn parse_pattern_list(text: &str) -> Result<Vec<String>, FilterError> {
    let trimmed = text.trim();
    if trimmed.starts_with('[') {
        match serde_json::from_str::<Vec<String>>(trimmed) {
            Ok(list) => return Ok(list.into_iter().filter(|p| !p.is_empty()).collect()),
            Err(e) if looks_like_json_array(trimmed) => return Err(FilterError::Json(e.to_string())),
            Err(_) => {}
        }
    }
    Ok(trimmed.lines().map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect())
}

/// A text that opens with `[` then a quote and closes with `]` was meant as JSON; a regex line such
/// as `[0-9]{16}` was not. (So a line list whose first line opens with `["` and whose last line
/// closes with `]` must be written as a JSON array instead.)
fn looks_like_json_array(trimmed: &str) -> bool {
    trimmed[1..].trim_start().starts_with('"') && trimmed.ends_with(']')
}

/// The keyword and regex lists of one configuration snapshot. Cloning is cheap (shared).
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    inner: Option<Arc<Lists>>,
}

#[derive(Debug)]
struct Lists {
    keywords: Option<Keywords>,
    regexes: Option<Regexes>,
    /// Bytes a stream filter keeps between pushes.
    tail_bytes: usize,
}

#[derive(Debug)]
struct Keywords {
    automaton: AhoCorasick,
    patterns: Vec<String>,
    /// Length in bytes of the longest keyword.
    max_len: usize,
}

#[derive(Debug)]
struct Regexes {
    matcher: RegexMatcher,
    patterns: Vec<String>,
    /// All the regexes as one lazy DFA reporting every pattern (`MatchKind::All`), walked by
    /// stream filters; `None` when it cannot be built, and then streams use the window.
    stream_dfa: Option<DFA>,
}

#[derive(Debug)]
enum RegexMatcher {
    Set(RegexSet),
    Each(Vec<Regex>),
}

impl FilterSet {
    /// Builds the set from the keyword and regex option texts (see [`parse_pattern_list`]).
    pub fn build(keywords: &str, regexes: &str) -> Result<FilterSet, FilterError> {
        let keywords = Keywords::build(parse_pattern_list(keywords)?)?;
        let regexes = Regexes::build(parse_pattern_list(regexes)?)?;
        if keywords.is_none() && regexes.is_none() {
            return Ok(FilterSet::default());
        }
        let keyword_tail = keywords.as_ref().map_or(0, |k| k.max_len.saturating_sub(1));
        let regex_tail = if regexes.is_some() { REGEX_WINDOW_BYTES } else { 0 };
        let tail_bytes = keyword_tail.max(regex_tail);
        Ok(FilterSet { inner: Some(Arc::new(Lists { keywords, regexes, tail_bytes })) })
    }

    /// Whether both lists are empty (every check passes).
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// The first pattern found in `text`, if any.
    pub fn check(&self, text: &str) -> Option<Match> {
        let lists = self.inner.as_deref()?;
        lists.keywords.as_ref().and_then(|k| k.find(text)).or_else(|| lists.regexes.as_ref()?.find(text))
    }

    /// A matcher for one streamed text (one completion).
    pub fn stream(&self) -> StreamFilter {
        StreamFilter { set: self.clone(), window: String::new(), regex: RegexCursor::Fresh }
    }
}

impl Keywords {
    fn build(patterns: Vec<String>) -> Result<Option<Keywords>, FilterError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let total: usize = patterns.iter().map(String::len).sum();
        // A full DFA scans 2-3x faster than the default NFA but takes ~250 bytes of memory per
        // keyword byte: used up to ~8 MB.
        let kind = (total <= DFA_KEYWORD_BYTES).then_some(AhoCorasickKind::DFA);
        let automaton = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .kind(kind)
            .build(&patterns)
            .map_err(|e| FilterError::Keywords(e.to_string()))?;
        let max_len = patterns.iter().map(String::len).max().unwrap_or(0);
        Ok(Some(Keywords { automaton, patterns, max_len }))
    }

    fn find(&self, text: &str) -> Option<Match> {
        let index = self.automaton.find(text)?.pattern().as_usize();
        Some(Match { kind: PatternKind::Keyword, index, pattern: self.patterns.get(index)?.clone() })
    }
}

impl Regexes {
    fn build(patterns: Vec<String>) -> Result<Option<Regexes>, FilterError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let compile_each = || -> Result<Vec<Regex>, FilterError> {
            patterns
                .iter()
                .enumerate()
                .map(|(index, p)| {
                    Regex::new(p).map_err(|e| FilterError::Regex {
                        index,
                        pattern: p.clone(),
                        message: e.to_string(),
                    })
                })
                .collect()
        };
        let matcher = match RegexSet::new(&patterns) {
            Ok(set) => RegexMatcher::Set(set),
            // Either one pattern is invalid (reported with its position) or the patterns are valid
            // one by one but too large together for a single set.
            Err(_) => RegexMatcher::Each(compile_each()?),
        };
        let stream_dfa = DFA::builder()
            .configure(DFA::config().match_kind(MatchKind::All).unicode_word_boundary(true))
            .build_many(&patterns)
            .ok();
        Ok(Some(Regexes { matcher, patterns, stream_dfa }))
    }

    fn find(&self, text: &str) -> Option<Match> {
        let index = match &self.matcher {
            RegexMatcher::Set(set) => {
                if !set.is_match(text) {
                    return None;
                }
                set.matches(text).iter().next()?
            }
            RegexMatcher::Each(list) => list.iter().position(|r| r.is_match(text))?,
        };
        self.matched(index)
    }

    fn matched(&self, index: usize) -> Option<Match> {
        Some(Match { kind: PatternKind::Regex, index, pattern: self.patterns.get(index)?.clone() })
    }

    /// Scans the newly pushed `chunk` (the end of `window`) from where the cursor stopped.
    fn stream_find(&self, cursor: &mut RegexCursor, window: &str, chunk: &str) -> Option<Match> {
        if let RegexCursor::Fresh = cursor {
            *cursor = self.start_cursor();
        }
        if let (RegexCursor::Dfa { cache, state }, Some(dfa)) = (&mut *cursor, &self.stream_dfa) {
            match walk(dfa, cache, state, chunk.as_bytes()) {
                Walk::Match(index) => return self.matched(index),
                Walk::NoMatch => return None,
                Walk::Stuck => *cursor = RegexCursor::Window,
            }
        }
        self.find(window)
    }

    fn start_cursor(&self) -> RegexCursor {
        let Some(dfa) = &self.stream_dfa else {
            return RegexCursor::Window;
        };
        let mut cache = dfa.create_cache();
        match dfa.start_state(&mut cache, &start::Config::new().anchored(Anchored::No)) {
            Ok(state) => RegexCursor::Dfa { cache: Box::new(cache), state },
            Err(_) => RegexCursor::Window,
        }
    }
}

/// Where a stream filter's regex scan stands.
#[derive(Debug, Clone)]
enum RegexCursor {
    /// Nothing pushed yet: no cache allocated.
    Fresh,
    /// Walking the lazy DFA; `state` is the state after the last byte pushed.
    Dfa { cache: Box<Cache>, state: LazyStateID },
    /// The DFA could not go on: windowed rescans from here on.
    Window,
}

enum Walk {
    Match(usize),
    NoMatch,
    Stuck,
}

/// Feeds `bytes` to the lazy DFA from `state`; at the end, also tries the end-of-text transition
/// without taking it, so a match ending exactly at the chunk's end is reported now.
fn walk(dfa: &DFA, cache: &mut Cache, state: &mut LazyStateID, bytes: &[u8]) -> Walk {
    for &b in bytes {
        let Ok(next) = dfa.next_state(cache, *state, b) else {
            return Walk::Stuck;
        };
        *state = next;
        if next.is_tagged() {
            if next.is_match() {
                return Walk::Match(first_pattern(dfa, cache, next));
            }
            if next.is_quit() {
                return Walk::Stuck;
            }
        }
    }
    // A cache reset during the end-of-text step would invalidate `state`, which the next push needs.
    let resets = cache.clear_count();
    match dfa.next_eoi_state(cache, *state) {
        Ok(end) if end.is_match() => Walk::Match(first_pattern(dfa, cache, end)),
        Ok(_) if cache.clear_count() == resets => Walk::NoMatch,
        _ => Walk::Stuck,
    }
}

/// The lowest-numbered pattern of a match state.
fn first_pattern(dfa: &DFA, cache: &Cache, state: LazyStateID) -> usize {
    (0..dfa.match_len(cache, state)).map(|i| dfa.match_pattern(cache, state, i).as_usize()).min().unwrap_or(0)
}

/// Scans one streamed text chunk by chunk (see the module docs for what it guarantees).
///
/// After it reports a match it forgets what it had seen and scans what follows as a new text;
/// a caller normally ends the stream at the first match.
#[derive(Debug, Clone)]
pub struct StreamFilter {
    set: FilterSet,
    /// The kept tail of earlier chunks, then the current chunk while it is scanned.
    window: String,
    regex: RegexCursor,
}

impl StreamFilter {
    /// Scans `chunk` together with what came before; returns the first match that ends in it.
    pub fn push(&mut self, chunk: &str) -> Option<Match> {
        let StreamFilter { set, window, regex } = self;
        let lists = set.inner.as_deref()?;
        if chunk.is_empty() {
            return None;
        }
        let seen = window.len();
        window.push_str(chunk);
        let found = lists
            .keywords
            .as_ref()
            .and_then(|k| {
                // A keyword ending in this chunk starts at most `max_len - 1` bytes before it.
                let from = window.floor_char_boundary(seen.saturating_sub(k.max_len.saturating_sub(1)));
                k.find(&window[from..])
            })
            .or_else(|| lists.regexes.as_ref()?.stream_find(regex, window, chunk));
        if found.is_some() {
            window.clear();
            *regex = RegexCursor::Fresh;
            return found;
        }
        if window.len() > lists.tail_bytes {
            let cut = window.floor_char_boundary(window.len() - lists.tail_bytes);
            window.drain(..cut);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keywords(list: &str) -> FilterSet {
        FilterSet::build(list, "").unwrap()
    }

    fn regexes(list: &str) -> FilterSet {
        FilterSet::build("", list).unwrap()
    }

    /// Pushes `chunks` in order; the first match reported, if any.
    fn stream_all(set: &FilterSet, chunks: &[&str]) -> Option<Match> {
        let mut s = set.stream();
        chunks.iter().find_map(|c| s.push(c))
    }

    #[test]
    fn lines_are_trimmed_and_empty_lines_dropped() {
        assert_eq!(parse_pattern_list("  foo \r\n\n bar baz\n\t\n").unwrap(), vec!["foo", "bar baz"]);
    }

    #[test]
    fn a_json_array_is_taken_verbatim_without_empty_entries() {
        assert_eq!(parse_pattern_list(r#" [" foo", "", "a\nb"] "#).unwrap(), vec![" foo", "a\nb"]);
    }

    #[test]
    fn a_regex_line_starting_with_a_bracket_is_not_json() {
        assert_eq!(parse_pattern_list("[0-9]{16}\n[a-z]+@x").unwrap(), vec!["[0-9]{16}", "[a-z]+@x"]);
    }

    #[test]
    fn a_broken_json_array_is_an_error() {
        assert!(matches!(parse_pattern_list(r#"["foo", 3]"#), Err(FilterError::Json(_))));
    }

    #[test]
    fn empty_lists_build_an_empty_set_that_passes_everything() {
        let set = FilterSet::build(" \n ", "[]").unwrap();
        assert!(set.is_empty());
        assert_eq!(set.check("anything"), None);
        assert_eq!(set.stream().push("anything"), None);
    }

    #[test]
    fn keywords_match_ascii_case_insensitively() {
        let m = keywords("Secret Plan").check("the SECRET plan is").unwrap();
        assert_eq!(m, Match { kind: PatternKind::Keyword, index: 0, pattern: "Secret Plan".into() });
    }

    #[test]
    fn non_ascii_keywords_match_exactly() {
        let set = keywords("违禁词\nÄrger");
        assert_eq!(set.check("这是违禁词吗").map(|m| m.index), Some(0));
        assert_eq!(set.check("kein ärger"), None);
    }

    #[test]
    fn a_text_without_any_pattern_passes() {
        assert_eq!(FilterSet::build("alpha\nbeta", r"\d{4}").unwrap().check("gamma 123"), None);
    }

    #[test]
    fn regexes_report_the_lowest_matching_index() {
        let m = regexes(r#"["zzz", "\\d{3}-\\d{4}", "\\d+"]"#).check("call 555-1234").unwrap();
        assert_eq!((m.kind, m.index, m.pattern.as_str()), (PatternKind::Regex, 1, r"\d{3}-\d{4}"));
    }

    #[test]
    fn regexes_are_case_sensitive_unless_they_say_otherwise() {
        let set = regexes("(?i)forbidden\nSecret");
        assert_eq!(set.check("FORBIDDEN").map(|m| m.index), Some(0));
        assert_eq!(set.check("secret"), None);
    }

    #[test]
    fn keywords_win_over_regexes() {
        let m = FilterSet::build("bad", "b.d").unwrap().check("bad").unwrap();
        assert_eq!(m.kind, PatternKind::Keyword);
    }

    #[test]
    fn an_invalid_regex_is_reported_with_its_position() {
        let err = FilterSet::build("", "ok\n(unclosed").unwrap_err();
        assert!(matches!(err, FilterError::Regex { index: 1, ref pattern, .. } if pattern == "(unclosed"));
    }

    #[test]
    fn regexes_too_large_for_one_set_still_work_one_by_one() {
        // Each pattern alone is under the default size limit; 40 of them together are not.
        let list: Vec<String> = (0..40).map(|i| format!(r"\w{{{}}}z{i}", 40 + i)).collect();
        let set = FilterSet::build("", &serde_json::to_string(&list).unwrap()).unwrap();
        let lists = set.inner.as_deref().unwrap();
        assert!(matches!(lists.regexes.as_ref().unwrap().matcher, RegexMatcher::Each(_)));
        let text = format!("{}z7", "a".repeat(47));
        assert_eq!(set.check(&text).map(|m| m.index), Some(7));
    }

    #[test]
    fn a_keyword_split_across_chunks_is_caught_in_the_chunk_that_completes_it() {
        let set = keywords("forbidden");
        let mut s = set.stream();
        assert_eq!(s.push("this is forb"), None);
        assert_eq!(s.push("id"), None);
        assert_eq!(s.push("den fruit").map(|m| m.index), Some(0));
    }

    #[test]
    fn a_keyword_split_inside_a_multibyte_character_run_is_caught() {
        let set = keywords("禁止词");
        assert!(stream_all(&set, &["前缀禁", "止", "词后缀"]).is_some());
    }

    #[test]
    fn a_reported_match_is_not_reported_again() {
        let set = keywords("bad");
        let mut s = set.stream();
        assert!(s.push("so bad").is_some());
        assert_eq!(s.push(" and more"), None);
    }

    #[test]
    fn a_regex_split_across_chunks_is_caught() {
        let set = regexes(r"\d{4}-\d{4}-\d{4}-\d{4}");
        assert!(stream_all(&set, &["card 4111-11", "11-1111-", "1111 ok"]).is_some());
    }

    #[test]
    fn a_regex_match_within_the_window_is_caught_after_many_chunks() {
        let set = regexes("start.*end");
        let mut chunks = vec!["start"];
        chunks.extend(std::iter::repeat_n("..", (REGEX_WINDOW_BYTES - 16) / 2));
        chunks.push("end");
        assert!(stream_all(&set, &chunks).is_some());
    }

    #[test]
    fn a_regex_match_of_any_length_is_caught_in_a_stream() {
        let set = regexes("start.*end");
        let filler = "x".repeat(REGEX_WINDOW_BYTES * 4);
        assert!(stream_all(&set, &["start", &filler, "en", "d"]).is_some());
    }

    #[test]
    fn a_regex_match_ending_exactly_at_a_chunk_end_is_caught_in_that_chunk() {
        let set = regexes(r"\d{3}");
        let mut s = set.stream();
        assert_eq!(s.push("ab1"), None);
        assert!(s.push("23").is_some());
    }

    #[test]
    fn a_caret_matches_only_at_the_start_of_the_stream() {
        let set = regexes("^hello");
        assert!(stream_all(&set, &["say ", "hello"]).is_none());
        assert!(stream_all(&set, &["hel", "lo there"]).is_some());
    }

    #[test]
    fn a_dollar_matches_at_every_chunk_end() {
        assert!(stream_all(&regexes("foo$"), &["foo", "bar"]).is_some());
    }

    #[test]
    fn streams_walk_the_lazy_dfa_until_a_unicode_word_boundary_meets_non_ascii_text() {
        let set = regexes(r"\bcard\b");
        let mut s = set.stream();
        s.push("plain ascii ");
        assert!(matches!(s.regex, RegexCursor::Dfa { .. }));
        s.push("café ");
        assert!(matches!(s.regex, RegexCursor::Window));
    }

    #[test]
    fn after_a_unicode_word_boundary_meets_non_ascii_text_short_matches_are_still_caught() {
        let set = regexes(r"\bcard \d{4}\b");
        assert!(stream_all(&set, &["café, ca", "rd 12", "34 ok"]).is_some());
    }

    #[test]
    fn after_a_unicode_word_boundary_meets_non_ascii_text_matches_longer_than_the_window_are_missed() {
        let set = regexes(r"\bstart.*end");
        let filler = "x".repeat(REGEX_WINDOW_BYTES + 1);
        assert!(stream_all(&set, &["é start", &filler, "end"]).is_none());
    }

    #[test]
    fn the_stream_tail_stays_bounded() {
        let set = FilterSet::build("abcdef", "q{3}").unwrap();
        let mut s = set.stream();
        for _ in 0..1000 {
            assert_eq!(s.push("0123456789é"), None);
        }
        assert!(s.window.len() <= REGEX_WINDOW_BYTES + 1);
    }

    #[test]
    fn an_empty_set_stream_never_allocates() {
        let set = FilterSet::default();
        let mut s = set.stream();
        assert_eq!(s.push("some text"), None);
        assert_eq!(s.window.capacity(), 0);
    }

    fn arb_chunks(text: String) -> impl Strategy<Value = (String, Vec<usize>)> {
        let len = text.chars().count();
        (Just(text), proptest::collection::vec(0..=len, 0..8))
    }

    /// Splits `text` at the given character positions.
    fn split_at_chars(text: &str, mut cuts: Vec<usize>) -> Vec<String> {
        cuts.sort_unstable();
        cuts.dedup();
        let bytes: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        let mut out = Vec::new();
        let mut start = 0;
        for c in cuts {
            let at = bytes[c];
            out.push(text[start..at].to_string());
            start = at;
        }
        out.push(text[start..].to_string());
        out
    }

    proptest! {
        #[test]
        fn any_split_finds_a_keyword_iff_the_whole_text_has_one(
            words in proptest::collection::vec("[abAé ]{1,5}", 1..4),
            (text, cuts) in "[abAé ]{0,40}".prop_flat_map(arb_chunks),
        ) {
            let set = FilterSet::build(&serde_json::to_string(&words).unwrap(), "").unwrap();
            let chunks = split_at_chars(&text, cuts);
            let chunk_refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
            prop_assert_eq!(stream_all(&set, &chunk_refs).is_some(), set.check(&text).is_some());
        }

        #[test]
        fn any_split_finds_a_regex_iff_the_whole_text_has_one(
            (text, cuts) in "[ab0-9 ]{0,60}".prop_flat_map(arb_chunks),
        ) {
            let set = regexes("a\\d{2,5}b\nb[a ]+a\n9(?:ab)*9");
            let chunks = split_at_chars(&text, cuts);
            let chunk_refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
            prop_assert_eq!(stream_all(&set, &chunk_refs).is_some(), set.check(&text).is_some());
        }

        #[test]
        fn any_split_finds_a_regex_with_a_leading_unicode_boundary_iff_the_whole_text_has_one(
            (text, cuts) in "[ab1é ]{0,60}".prop_flat_map(arb_chunks),
        ) {
            let set = regexes(r"\bab+1");
            let chunks = split_at_chars(&text, cuts);
            let chunk_refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
            prop_assert_eq!(stream_all(&set, &chunk_refs).is_some(), set.check(&text).is_some());
        }
    }

    /// `cargo test --release -p burncloud-core --lib -- filter::tests::timing --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing_check_of_a_10_kb_prompt_against_1000_keywords() {
        let mut rng = fastrand::Rng::with_seed(7);
        let keywords: Vec<String> =
            (0..1000).map(|_| (0..rng.usize(6..16)).map(|_| rng.lowercase()).collect::<String>()).collect();
        let keywords = serde_json::to_string(&keywords).unwrap();
        let words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "gateway", "token"];
        let mut prompt = String::new();
        while prompt.len() < 10_000 {
            prompt.push_str(words[rng.usize(..words.len())]);
            prompt.push(' ');
        }
        for (name, regexes) in [("1000 keywords", ""), ("1 regex", r"\b\d{16}\b"), ("both", r"\b\d{16}\b")] {
            let kw = if name == "1 regex" { "" } else { keywords.as_str() };
            let set = FilterSet::build(kw, regexes).unwrap();
            let n = 2000;
            let start = std::time::Instant::now();
            let mut hits = 0;
            for _ in 0..n {
                hits += usize::from(set.check(std::hint::black_box(&prompt)).is_some());
            }
            let per = start.elapsed() / n;
            let mut stream = set.stream();
            let start = std::time::Instant::now();
            for chunk in prompt.as_bytes().chunks(20) {
                hits += usize::from(stream.push(std::str::from_utf8(chunk).unwrap()).is_some());
            }
            let streamed = start.elapsed();
            let memory = set
                .inner
                .as_deref()
                .and_then(|l| l.keywords.as_ref())
                .map_or(0, |k| k.automaton.memory_usage());
            println!("{name}: keyword automaton {memory} bytes");
            println!(
                "{name}: check(10 KB) {per:?}; same text streamed in 20-byte chunks {streamed:?} ({hits} hits)"
            );
        }
    }
}
