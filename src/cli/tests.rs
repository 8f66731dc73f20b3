use super::*;

#[test]
fn exit_codes_follow_the_readme() {
    let code = |e: omnibox::Error| exit_code(&anyhow::Error::from(e));
    assert_eq!(code(omnibox::Error::Broker("commit failed".into())), 4);
    assert_eq!(code(omnibox::Error::Config("bad".into())), 2);
    assert_eq!(exit_code(&anyhow::Error::from(UsageError("x".into()))), 2);
}
